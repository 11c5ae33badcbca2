"""`launch doctor`: a pasteable report of what a launch would see, and the problems that would make it fail.

Run it plainly, under torchrun (every rank's view is gathered on rank 0) or under srun.
Exit 0: nothing found that would break a launch (warnings may still be printed); exit 1: problems.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import sys

import psutil

from launch.errors import UserError


def add_arguments(p) -> None:
    p.add_argument("--run-dir", default="runs", help="directory whose free disk space to report (default: runs)")
    p.add_argument("--port", type=int, default=29500, help="port to check for availability (default: 29500, torchrun's default)")
    p.add_argument("--nproc", type=int, default=None, help="processes per node you plan to start (default: what the launcher says, else 1)")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def collect(args) -> tuple[list[tuple[str, str]], list[str], list[str], object]:
    """Rows of (name, value), problems (launch would fail) and warnings, and the detected env (or None)."""
    import torch
    import torch.distributed as dist

    from launch.processes import dist as dist_mod

    rows: list[tuple[str, str]] = []
    problems: list[str] = []
    warnings: list[str] = []
    add = lambda k, v: rows.append((k, str(v)))  # noqa: E731

    add("host", socket.gethostname())
    add("python", sys.version.split()[0] + f" ({platform.platform()})")
    add("torch", f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'})")
    cuda = torch.cuda.is_available()
    n_gpu = torch.cuda.device_count() if cuda else 0
    add("CUDA available", f"{cuda}, {n_gpu} visible device(s); CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}")
    for i in range(n_gpu):
        p = torch.cuda.get_device_properties(i)
        add(f"  cuda:{i}", f"{p.name}, {p.total_memory / 2**30:.1f} GiB")
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    add("MPS available", mps)
    add("backends", f"gloo={dist.is_gloo_available()} nccl={dist.is_nccl_available()} mpi={dist.is_mpi_available()}")

    env = None
    try:
        env = dist_mod.detect()
        add("launcher", env.launcher)
        add("rank / local rank / world size", f"{env.rank} / {env.local_rank} / {env.world_size} (local world size {env.local_world_size})")
        add("master", f"{env.master_addr}:{env.master_port}" if env.distributed else "- (no process group)")
        add("torchrun restarts", env.restart_count)
    except UserError as e:
        problems.append(str(e))
        add("launcher", "inconsistent (see problems)")

    slurm = {k: v for k, v in sorted(os.environ.items()) if k in (
        "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NNODES", "SLURM_NTASKS_PER_NODE",
        "SLURM_JOB_NODELIST", "SLURM_CPUS_PER_TASK", "SLURM_GPUS_PER_NODE")}
    add("SLURM", " ".join(f"{k}={v}" for k, v in slurm.items()) or "not in a SLURM job")
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var in os.environ:
            add(var, os.environ[var])
    if "SLURM_NTASKS" in os.environ and "WORLD_SIZE" in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ:
        if os.environ["WORLD_SIZE"] != os.environ["SLURM_NTASKS"] and not any(p.startswith("WORLD_SIZE=") for p in problems):
            problems.append(f"WORLD_SIZE={os.environ['WORLD_SIZE']} disagrees with SLURM_NTASKS={os.environ['SLURM_NTASKS']}")

    cores = os.cpu_count() or 1
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = cores
    mem = psutil.virtual_memory()
    add("CPU cores", f"{cores} logical, {psutil.cpu_count(logical=False) or '?'} physical, {usable} usable by this process")
    add("memory", f"{mem.total / 2**30:.1f} GiB total, {mem.available / 2**30:.1f} GiB available")
    per_node = args.nproc or (env.local_world_size if env is not None else 1)
    omp = os.environ.get("OMP_NUM_THREADS")
    threads = int(omp) if omp and omp.isdigit() else torch.get_num_threads()
    add("OMP_NUM_THREADS", f"{omp or 'unset'} (torch uses {torch.get_num_threads()} threads; {per_node} process(es) per node)")
    if per_node * threads > usable:
        warnings.append(f"oversubscribed CPU: {per_node} processes x {threads} threads > {usable} usable cores; set OMP_NUM_THREADS={max(1, usable // per_node)}")
    if cuda and per_node > n_gpu:
        problems.append(f"{per_node} processes per node but only {n_gpu} visible GPU(s)")

    disk_dir = args.run_dir if os.path.isdir(args.run_dir) else os.path.dirname(os.path.abspath(args.run_dir)) or "."
    while not os.path.isdir(disk_dir):
        disk_dir = os.path.dirname(disk_dir) or "."
    free = shutil.disk_usage(disk_dir).free
    add("free disk", f"{free / 2**30:.1f} GiB in {os.path.abspath(disk_dir)}")
    if free < 1 * 2**30:
        warnings.append(f"less than 1 GiB free in {disk_dir}: checkpoints may fail to save")
    port_ok = _port_free(args.port)
    add(f"port {args.port}", "free" if port_ok else "IN USE")
    if not port_ok and (env is None or not env.distributed):
        warnings.append(f"port {args.port} is in use: use torchrun --standalone (or --rdzv-endpoint=localhost:0), or python train_ddp.py --nproc N, which pick free ports")
    return rows, problems, warnings, env


def _format(rows, problems, warnings, title: str) -> str:
    width = max(len(k) for k, _ in rows)
    out = [title] + [f"  {k.ljust(width)}  {v}" for k, v in rows]
    out += [f"  WARNING: {w}" for w in warnings]
    out += [f"  PROBLEM: {p}" for p in problems]
    return "\n".join(out)


def run(args) -> int:
    rows, problems, warnings, env = collect(args)
    if env is not None and env.distributed and env.world_size > 1:
        # Every rank's view, gathered on rank 0 (a short-lived gloo group, so it works on GPU-less login nodes too).
        import datetime

        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
        views = [None] * env.world_size
        dist.all_gather_object(views, (env.rank, rows, problems, warnings))
        if env.rank == 0:
            for rank, r, p, w in sorted(views, key=lambda v: v[0]):
                print(_format(r, p, w, f"rank {rank}:"), flush=True)
        bad = any(v[2] for v in views)
        dist.destroy_process_group()
        return 1 if bad else 0
    print(_format(rows, problems, warnings, "launch doctor:"), flush=True)
    if problems:
        print(f"doctor found {len(problems)} problem(s) that would make a launch fail: " + "; ".join(problems), file=sys.stderr)
        return 1
    return 0
