"""Shared test helpers: run the real entry points as subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TORCHRUN = [PY, "-m", "torch.distributed.run"]

# A small, fast job: a few hundred samples, a small MLP, no progress bar.
SMALL = [
    "data.n_train=384", "data.n_eval=100", "data.features=16", "model.hidden=[32,16]",
    "data.batch_size=16", "train.epochs=2", "log.progress=false", "train.device=cpu",
]


def env(**extra) -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    e.pop("LAUNCH_FAULT", None)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def run(args: list[str], timeout: float = 120, **extra_env) -> subprocess.CompletedProcess:
    """Run a command in the repo root; return the finished process with text output and .wall."""
    t0 = time.monotonic()
    p = subprocess.run(args, cwd=ROOT, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)
    p.wall = time.monotonic() - t0
    return p


def single(run_dir, *overrides, **kw) -> subprocess.CompletedProcess:
    return run([PY, "train_single.py", *SMALL, f"run.dir={run_dir}", *overrides], **kw)


def spawn(n: int, run_dir, *overrides, **kw) -> subprocess.CompletedProcess:
    return run([PY, "train_ddp.py", "--nproc", str(n), *SMALL, f"run.dir={run_dir}", *overrides], **kw)


def torchrun(n: int, run_dir, *overrides, torchrun_args=(), **kw) -> subprocess.CompletedProcess:
    return run([*TORCHRUN, "--standalone", f"--nproc_per_node={n}", *torchrun_args, "train_ddp.py", *SMALL, f"run.dir={run_dir}", *overrides], **kw)


def output(p: subprocess.CompletedProcess) -> str:
    return f"exit {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"


def wait_for(what: str, found, proc: subprocess.Popen, deadline_s: float = 120):
    """Poll `found()` until it returns something truthy (returned); fail if `proc` exits first or the deadline passes."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        hit = found()
        if hit:
            return hit
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen (exit {proc.poll()})")


def forked() -> str:
    """The start method for a test's own `mp.start_processes`: a forkserver that imported torch and the
    training code (and transformers, peft) once per pytest worker, so each rank starts without an interpreter start-up of its own
    (about 2 s of CPU each), as the `--nproc` launcher does (launch.processes.entry)."""
    import multiprocessing

    # and the Hugging Face stack where installed (a missing one is skipped by the server): a rank that
    # builds a Llama or a LoRA model would import it for seconds of its own
    multiprocessing.set_forkserver_preload(["torch", "launch.train.loop", "transformers", "transformers.models.llama.modeling_llama", "peft"])
    return "forkserver"
