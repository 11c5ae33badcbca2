"""Several training runs in one set of real gloo processes (tests/test_finetune.py and any test whose runs need no launcher of their own).

Starting processes that import torch, transformers and peft costs more than the tiny runs themselves,
so `run_jobs(k, jobs, out)` spawns k ranks once and has them run `launch.train.loop.train` job after
job on one process group, each job a fresh run (its own config, run directory, model and resume from
disk, as a rerun of the command would have). A job is (name, overrides, LAUNCH_FAULT) or (name, overrides,
LAUNCH_FAULT, env): a stop fault makes the run save and stop (launch.processes.stopping.Stopped), as a
signal would; env (a dict) holds environment variables set for that job only. Overrides may start with
"--config", FILE, as on the command line. Each rank writes what it printed to <out>/<name>.<rank>.log
and how the job ended to <out>/<name>.<rank>.json (a stop with the exit code it would have given).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import forked


def _worker(rank: int, k: int, port: int, jobs: list, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(k), LOCAL_WORLD_SIZE=str(k),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LAUNCH_LAUNCHER="spawn", LAUNCH_STORE_HOSTED="1")
    import torch

    torch.set_num_threads(1)
    from launch import config
    from launch.errors import UserError
    from launch.processes import dist as dist_mod
    from launch.processes.stopping import Stopped
    from launch.train.loop import train

    rt = None
    seen: dict = {}
    for name, overrides, fault, *job_env in jobs:
        extra = {k: str(v) for k, v in (job_env[0] if job_env else {}).items()}
        before = {k: os.environ.get(k) for k in extra}
        os.environ.update(extra)
        cfg = config.load(overrides[1], overrides[2:]) if overrides[:1] == ["--config"] else config.load(None, overrides)
        rt = rt or dist_mod.setup(cfg, dist_mod.detect())
        os.environ["LAUNCH_FAULT"] = fault
        seen[name] = seen.get(name, 0) + 1
        tag = f"{name}.{rank}" + (f".{seen[name]}" if seen[name] > 1 else "")
        with open(Path(out, f"{tag}.log"), "w") as log, contextlib.redirect_stdout(log):
            try:
                train(cfg, rt)
                ended = {"ended": "done"}
            except Stopped as e:
                ended = {"ended": "stopped", "message": str(e), "code": e.code}
            except UserError as e:  # every rank meets it alike: the next job runs on
                ended = {"ended": "error", "message": str(e)}
        Path(out, f"{tag}.json").write_text(json.dumps(ended))
        for k, v in before.items():  # the job's env ends with it
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    os.environ.pop("LAUNCH_FAULT", None)
    dist_mod.teardown(rt)


def run_jobs(k: int, jobs: list, out) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = dist.TCPStore("127.0.0.1", 0, k, is_master=True, wait_for_workers=False)
    mp.start_processes(_worker, args=(k, store.port, jobs, str(out)), nprocs=k, start_method=forked())


def ended(out, name: str, rank: int = 0, attempt: int = 1) -> dict:
    return json.loads(Path(out, f"{name}.{rank}" + (f".{attempt}" if attempt > 1 else "") + ".json").read_text())


def log(out, name: str, rank: int = 0, attempt: int = 1) -> str:
    return Path(out, f"{name}.{rank}" + (f".{attempt}" if attempt > 1 else "") + ".log").read_text()


@contextlib.contextmanager
def one_thread():
    """In-process runs use one thread, as the spawned ranks do: on a shared 2-core machine torch's
    default (a thread per core) spends most of a tiny model's step waiting at OpenMP barriers."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
