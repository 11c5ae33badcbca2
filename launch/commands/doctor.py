"""`launch doctor`: a pasteable report of what a launch would see, and the problems that would make it fail.

Run it plainly, under torchrun (every rank's view is gathered on rank 0), under srun, or in a
Kubernetes pod (`kubectl exec POD -- python -m launch doctor --run-dir /runs/NAME`: it shows the PET_*
variables the Trainer's runtime set, which torchrun reads as its options).
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


# Filesystems by what the other nodes see of a run directory on them (the fstype of its mount).
SHARED_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "lustre", "gpfs", "beegfs", "glusterfs", "wekafs",
             "orangefs", "pvfs2", "ocfs2", "gfs2", "virtiofs"}
CONTAINER_FS = {"overlay", "aufs", "tmpfs", "ramfs"}  # the container's own, or memory: gone with the pod
NODE_FS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "vfat", "exfat", "ntfs", "ntfs3", "apfs", "hfs"}


def filesystem_of(path: str, partitions=None) -> tuple[str, str, str]:
    """(fstype, mount point, device) of the mount that holds `path` (or its nearest existing parent):
    the longest mount point above it, the last one mounted there when several are."""
    head, tail = os.path.abspath(path), ""
    while not os.path.exists(head):  # a run directory not made yet: where it would be made
        head, tail = os.path.dirname(head), os.path.join(os.path.basename(head), tail)
    real = os.path.join(os.path.realpath(head), tail).rstrip("/") or "/"
    best = ("unknown", "/", "?")
    for part in psutil.disk_partitions(all=True) if partitions is None else partitions:
        mp = part.mountpoint.rstrip("/") or "/"
        if (real == mp or real.startswith(mp + "/") or mp == "/") and len(mp) >= len(best[1].rstrip("/") or "/"):
            best = (part.fstype, part.mountpoint, part.device)
    return best


def sharing(fstype: str) -> str:
    if fstype in SHARED_FS:
        return "shared between nodes"
    if fstype in CONTAINER_FS:
        return "the container's own or memory: gone with the pod, seen by no other node"
    if fstype in NODE_FS:
        return "a disk of this node (or a ReadWriteOnce volume): seen by no other node"
    return "unknown whether other nodes see it" + (" (FUSE: shared if its backend is)" if fstype.startswith("fuse") else "")


def _nodes(env) -> int:
    """How many nodes the launch spans, from whatever says so."""
    counts = [env.world_size // max(env.local_world_size, 1) if env is not None else 1]
    for var in ("PET_NNODES", "SLURM_NNODES"):
        value = os.environ.get(var, "").split(":")[-1]
        counts.append(int(value) if value.isdigit() else 1)
    return max(counts)


def _kubernetes_rows(add, problems, warnings) -> None:
    """The pod and the PET_* variables (Kubeflow Trainer's torch runtime sets them; torchrun reads PET_<OPTION>)."""
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    add("Kubernetes", f"in a pod (KUBERNETES_SERVICE_HOST={host})" if host else "not in a pod")
    pet = {k: v for k, v in sorted(os.environ.items()) if k.startswith("PET_")}
    add("PET_* (torchrun options)", " ".join(f"{k}={v}" for k, v in pet.items()) or "none set")
    nnodes, rank = pet.get("PET_NNODES", "").split(":")[-1], pet.get("PET_NODE_RANK", "")
    if nnodes.isdigit() and rank.isdigit() and int(rank) >= int(nnodes):
        problems.append(f"PET_NODE_RANK={rank} but PET_NNODES={pet['PET_NNODES']}: node ranks run from 0 to {int(nnodes) - 1}")
    if nnodes.isdigit() and int(nnodes) > 1 and pet.get("PET_MASTER_ADDR", "").lower() in ("localhost", "127.0.0.1", "::1"):
        warnings.append(f"PET_MASTER_ADDR={pet['PET_MASTER_ADDR']} with PET_NNODES={nnodes}: on separate nodes each would wait for itself")


def _run_dir_rows(add, warnings, run_dir: str, nodes: int) -> None:
    """The run directory's filesystem, and the risk when more than one node, or a pod, writes there."""
    fstype, mountpoint, device = filesystem_of(run_dir)
    kind = sharing(fstype)
    add("run dir filesystem", f"{fstype} at {mountpoint} ({device}): {kind}")
    in_pod = "KUBERNETES_SERVICE_HOST" in os.environ
    if fstype in CONTAINER_FS and (in_pod or nodes > 1):
        warnings.append(
            f"run directory {run_dir} is on {fstype} ({mountpoint}), {kind}: a preempted or deleted pod's checkpoints go with it "
            "and no rerun can resume; put run.dir on a ReadWriteMany PersistentVolumeClaim (launch k8s --pvc) or a shared filesystem"
        )
    elif fstype in NODE_FS and nodes > 1:
        warnings.append(
            f"run directory {run_dir} is on {fstype} ({mountpoint}), {kind}, but this launch spans {nodes} nodes: rank 0's checkpoints, "
            "the lock and STOP must be in one directory every node sees; use NFS, Lustre, CephFS or a ReadWriteMany PersistentVolumeClaim"
        )


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
    _kubernetes_rows(add, problems, warnings)
    pet_nproc = os.environ.get("PET_NPROC_PER_NODE", "")
    launched = env is not None and env.distributed
    per_node = args.nproc or (env.local_world_size if launched else int(pet_nproc) if pet_nproc.isdigit() else 1)
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
    _run_dir_rows(add, warnings, args.run_dir, _nodes(env))
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
