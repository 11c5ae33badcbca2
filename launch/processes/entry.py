"""What train_single.py and train_ddp.py share: argument parsing, the worker, the `--nproc` parent.

Error policy (see launch/errors.py):
- user mistakes: one line from rank 0, exit 2, raised before the process group exists where possible;
- a rendezvous problem (launch.processes.rendezvous): one line from every rank that meets it, exit 2;
- a peer died: one line, exit 4, no collective teardown (it could hang), the launcher reaps the rest;
- a collective timed out (launch.processes.hangs): one line per rank naming the collective, its number and
  the culprit, the flight record kept in <run dir>/hang/, exit 5;
- anything else: the traceback, via torchrun's @record error file when under torchrun.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import traceback
from typing import NoReturn

from launch.processes import lifeline  # first: it notes the parent pid before the slow imports
from launch import config as config_mod
from launch.errors import EXIT_CRASH, EXIT_HANG, EXIT_PEER_FAILED, EXIT_STOPPED, EXIT_USAGE, UserError, fail


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        fail(f"{message} (see --help)", EXIT_USAGE)


def parse(argv, prog: str, ddp: bool):
    p = _Parser(
        prog=prog,
        description="Train the configured model. Settings: --config FILE and key=value overrides, before or after it (CLI > file > defaults).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (section.key = default  # meaning):\n" + config_mod.reference(),
    )
    p.add_argument("--config", "-c", help="YAML file with sections run, model, data, train, dist, ckpt, log")
    if ddp:
        p.add_argument("--nproc", type=int, help="start this many local processes with torch.multiprocessing, forked from a server that imported torch once (no torchrun needed)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="e.g. train.lr=0.05 data.batch_size=64 model.kwargs.dropout=0.1 (merged into the file's model.kwargs; null removes a key)")
    args = p.parse_intermixed_args(argv)  # overrides may stand on both sides of --config
    try:
        cfg = config_mod.load(args.config, args.overrides)
    except UserError as e:
        fail(str(e), e.code)
    if ddp and args.nproc is not None and args.nproc < 1:
        fail(f"--nproc must be >= 1, got {args.nproc}")
    return cfg, (getattr(args, "nproc", None) if ddp else None)


def _is_peer_failure(exc: BaseException) -> bool:
    """A collective failed because another rank went away (it prints its own traceback)."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    if isinstance(exc, BrokenPipeError):  # our own stdout was closed, not a peer
        return False
    text = str(exc)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted", "Timed out waiting", "Socket Timeout"))


def _say_once(line: str) -> None:
    """One write for line and newline: under PYTHONUNBUFFERED print() writes them apart, and the
    ranks that share a terminal or a pipe print at the same moment (one write < PIPE_BUF is atomic)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def run_worker(cfg) -> int:
    """Set up, train, tear down. Returns the exit code (the caller exits)."""
    from launch.parallel.mesh import layout
    from launch.processes import dist as dist_mod, hangs
    from launch.processes.rendezvous import RendezvousError
    from launch.processes.stopping import Stopped, as_launcher_ends_it
    from launch.train.loop import train

    try:
        env = dist_mod.detect()
    except UserError as e:
        fail(str(e), e.code)
    if env.distributed:
        # A launcher's worker dies with it (kill -9 of torchrun leaves orphans otherwise). Not under
        # plain python: `nohup python train_single.py &` must outlive its shell.
        lifeline.die_with_parent()
    rt = None
    try:
        layout(cfg, env)  # dist.tp / dist.replicate against the world size: one line before any process group work
        rt = dist_mod.setup(cfg, env)
        result = train(cfg, rt)
        if env.is_main and result:
            acc = f"eval_accuracy {result['eval_accuracy']:.4f} " if "eval_accuracy" in result else ""
            print(f"done: {acc}eval_loss {result['eval_loss']:.4f} at epoch {result['epoch']} step {result['step']}; run dir {cfg.run.dir}", flush=True)
        dist_mod.teardown(rt)
        return 0
    except RendezvousError as e:  # each rank may see another problem (or be the only one that fails)
        _say_once(f"error: rank {env.rank}: {e}")
        dist_mod.exit_hard(e.code)
    except UserError as e:
        if env.is_main:
            print(f"error: {e}", file=sys.stderr, flush=True)
        dist_mod.exit_hard(e.code)
    except Stopped as e:
        # Every rank agreed on this stop and passed the save barrier: a normal teardown is safe.
        # Under torchrun a stop exits 0 (it restarts failed workers; not in a Kubeflow pod); the line says what the job exits with.
        e = as_launcher_ends_it(e, env.launcher, cfg.run_dir)
        if env.is_main:
            print(("" if e.code in (EXIT_STOPPED, 0) else "error: ") + str(e), file=sys.stderr, flush=True)
        if rt is not None:
            dist_mod.teardown(rt)
        return e.code
    except Exception as e:
        if rt is not None and env.distributed and (hangs.is_timeout(e) or (_is_peer_failure(e) and hangs.peer_timed_out(rt))):
            _say_once(f"error: {hangs.report(rt, cfg.run_dir, e)}")
            hangs.finish(rt)
            dist_mod.exit_hard(EXIT_HANG)
        if rt is not None and env.distributed and _is_peer_failure(e):
            first = re.sub(r"^\[[^\]]*\] ", "", (str(e).strip().splitlines() or [type(e).__name__])[0])[:120]
            print(f"rank {env.rank}: stopping because another rank failed ({first})", file=sys.stderr, flush=True)
            dist_mod.exit_hard(EXIT_PEER_FAILED)
        raise


def worker_main(cfg) -> NoReturn:
    """Process entry under every launcher. A crash is recorded for torchrun (@record: its summary
    then shows this traceback as the root cause), printed once otherwise, and the process leaves
    at once: no interpreter teardown that could block on a half-dead process group."""
    from torch.distributed.elastic.multiprocessing.errors import record

    from launch.processes.dist import exit_hard

    try:
        code = record(run_worker)(cfg)
    except Exception:
        if "TORCHELASTIC_ERROR_FILE" not in os.environ:
            traceback.print_exc()
        exit_hard(EXIT_CRASH)
    exit_hard(code)


# --------------------------------------------------------------------------- --nproc (torch.multiprocessing)


def _spawn_entry(local_rank: int, nproc: int, port: int, cfg_dict: dict) -> None:
    """Child of `--nproc N` (module level so it can be pickled), forked by the forkserver: its parent,
    whose death must take it down (launch.processes.lifeline), is that server, taken here at once."""
    os.environ[lifeline.PARENT_ENV] = str(os.getppid())
    os.environ.update(
        RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LAUNCH_LAUNCHER="spawn", LAUNCH_STORE_HOSTED="1",
    )
    worker_main(config_mod.from_dict(cfg_dict))


def spawn(cfg, nproc: int) -> int:
    """Run `nproc` local workers. The parent hosts the rendezvous store on a free port it holds
    (port 0), so two runs on one host never race for a port."""
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if cfg.train.device in ("cuda", "auto") and torch.cuda.is_available() and nproc > torch.cuda.device_count():
        fail(f"--nproc {nproc} but only {torch.cuda.device_count()} visible GPU(s) (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        fail("train.device=cuda but CUDA is not available; use train.device=cpu or auto")
    # spawn leaves OMP threads unset: N workers x all cores each oversubscribes the CPU badly.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    store = dist.TCPStore("127.0.0.1", 0, nproc, is_master=True, wait_for_workers=False)
    ctx = mp.start_processes(_spawn_entry, args=(nproc, store.port, cfg.to_dict()), nprocs=nproc, join=False, start_method=_start_method())

    def forward(signum, frame):  # Ctrl-C, SIGTERM, SIGUSR1 to the parent reach every worker (SIGUSR1 would kill it)
        for p in ctx.processes:
            if p.is_alive():
                os.kill(p.pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):  # the workers' stop signals (launch.processes.stopping)
        signal.signal(sig, forward)
    try:
        # After a failure, peers get 5 s to leave on their own (they see the dead peer within
        # milliseconds), then SIGTERM, then SIGKILL: never the 30 s default grace period.
        while not ctx.join(timeout=0.5, grace_period=5):
            pass
    except (mp.ProcessExitedException, mp.ProcessRaisedException):
        return _root_cause(ctx)
    return 0


def _start_method() -> str:
    """A forkserver that imports torch and the training code once, then forks each worker from that
    state: N workers cost one interpreter start-up instead of N (about 2 s of CPU each, a third of a
    short run on a small machine). It only imports: no CUDA context, no threads, no process group
    exists in it, which is what makes forking safe. Its workers inherit its environment from when it
    started (this process's, here). The server dies with this process (launch.processes.server), each
    worker with the server. Linux only, as the DataLoader's fork (launch.data.loader): macOS's system
    frameworks are not fork-safe once torch has loaded them, and Windows has no forkserver: spawn there."""
    import multiprocessing

    if not sys.platform.startswith("linux") or "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    os.environ[lifeline.PARENT_ENV] = str(os.getpid())  # the server's parent (launch.processes.server)
    multiprocessing.set_forkserver_preload(["launch.processes.server", "torch", "launch.train.loop"])
    return "forkserver"


def _root_cause(ctx) -> int:
    """The exit code of the rank that failed first, not of the peers that stopped because of it."""
    for rank, p in enumerate(ctx.processes):
        code = p.exitcode
        if code is None or code == 0 or code in (EXIT_PEER_FAILED, -signal.SIGTERM):
            continue
        if code < 0:
            print(f"error: rank {rank} was killed by {signal.Signals(-code).name}", file=sys.stderr, flush=True)
            return 128 - code
        return code
    codes = [p.exitcode for p in ctx.processes if p.exitcode]
    return codes[0] if codes and codes[0] > 0 else EXIT_CRASH


def main_ddp(argv=None) -> None:
    cfg, nproc = parse(sys.argv[1:] if argv is None else argv, "train_ddp.py", ddp=True)
    if nproc is not None:
        from launch.processes import dist as dist_mod

        try:
            env = dist_mod.detect()
        except UserError as e:
            fail(str(e), e.code)
        if env.launcher != "plain":
            fail(f"--nproc starts its own processes; it cannot run under {env.launcher} (drop --nproc)")
        sys.exit(spawn(cfg, nproc))
    if "RANK" not in os.environ and "SLURM_PROCID" not in os.environ:
        print("note: no launcher variables found: training in one process (use torchrun, srun or --nproc N for DDP)", file=sys.stderr, flush=True)
    worker_main(cfg)


def main_single(argv=None) -> None:
    cfg, _ = parse(sys.argv[1:] if argv is None else argv, "train_single.py", ddp=False)
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        fail("train_single.py runs one process; use train_ddp.py under torchrun/srun")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        os.environ.pop(var, None)
    os.environ.pop("SLURM_PROCID", None)
    worker_main(cfg)
