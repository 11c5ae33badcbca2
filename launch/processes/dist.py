"""Where am I running? One place that reads the launcher's environment and sets up devices and the process group.

Four launchers, one contract:
- plain `python`: world size 1, no process group, no `dist.*` call at all;
- `torchrun`: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT;
- `python train_ddp.py --nproc N`: torch.multiprocessing (forkserver); the parent hosts the
  rendezvous store on a free port (port 0), so two such runs never collide;
- `srun` one task per device: SLURM_PROCID/LOCALID/NTASKS/NNODES mapped to the same fields.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import NoReturn, Optional

import torch
import torch.distributed as dist

from launch.errors import UserError
from launch.processes import hangs, rendezvous
from launch.processes.rendezvous import RendezvousError


@dataclass
class DistEnv:
    launcher: str  # plain | torchrun | spawn | slurm
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    restart_count: int = 0  # TORCHELASTIC_RESTART_COUNT: how often torchrun restarted the group

    @property
    def distributed(self) -> bool:
        """True when a process group is used (any launcher but plain python)."""
        return self.launcher != "plain"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(environ, name: str) -> int:
    value = environ.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"environment variable {name} must be an integer, got {value!r}") from None


def slurm_head_node(nodelist: str) -> str:
    """First host of the allocation; never fall back to localhost (that silently splits a multi-node job)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"cannot resolve the head node of SLURM_JOB_NODELIST={nodelist!r}: {e}") from None
    hosts = out.stdout.split()
    if out.returncode != 0 or not hosts:
        raise UserError(f"cannot resolve the head node of SLURM_JOB_NODELIST={nodelist!r}: {out.stderr.strip() or 'no hosts'}")
    return hosts[0]


def detect(environ=None) -> DistEnv:
    """Read the launcher's variables; raise UserError when they contradict each other."""
    env = os.environ if environ is None else environ
    restarts = int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if "TORCHELASTIC_RUN_ID" in env or env.get("LAUNCH_LAUNCHER") == "spawn" or (
        "LOCAL_RANK" in env and "RANK" in env and "WORLD_SIZE" in env
    ):
        launcher = "spawn" if env.get("LAUNCH_LAUNCHER") == "spawn" else "torchrun"
        out = DistEnv(
            launcher=launcher,
            rank=_int(env, "RANK"),
            local_rank=_int(env, "LOCAL_RANK"),
            world_size=_int(env, "WORLD_SIZE"),
            local_world_size=_int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else _int(env, "WORLD_SIZE"),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else None,
            restart_count=restarts,
        )
        if out.master_port is None:
            raise UserError("RANK/LOCAL_RANK/WORLD_SIZE are set but MASTER_PORT is not (launch with torchrun)")
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        # srun with one task per device. (torchrun inside SLURM is caught above: there
        # SLURM_NTASKS counts agents, not ranks.)
        world = _int(env, "SLURM_NTASKS")
        if "WORLD_SIZE" in env and _int(env, "WORLD_SIZE") != world:
            raise UserError(f"WORLD_SIZE={env['WORLD_SIZE']} disagrees with SLURM_NTASKS={world}; unset WORLD_SIZE or fix the srun task count")
        nnodes = _int(env, "SLURM_NNODES") if "SLURM_NNODES" in env else 1
        if world % nnodes:
            raise UserError(f"SLURM_NTASKS={world} is not a multiple of SLURM_NNODES={nnodes}: use --ntasks-per-node")
        addr = env.get("MASTER_ADDR") or slurm_head_node(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 20000 + _int(env, "SLURM_JOB_ID") % 20000
        out = DistEnv("slurm", _int(env, "SLURM_PROCID"), _int(env, "SLURM_LOCALID"), world, world // nnodes, addr, port, restarts)
    else:
        if "WORLD_SIZE" in env and env["WORLD_SIZE"] not in ("", "1"):
            raise UserError(f"WORLD_SIZE={env['WORLD_SIZE']} is set but RANK/LOCAL_RANK are not: launch with torchrun, srun or --nproc")
        if "SLURM_NTASKS" in env and "WORLD_SIZE" in env and env["WORLD_SIZE"] != env["SLURM_NTASKS"]:
            raise UserError(f"WORLD_SIZE={env['WORLD_SIZE']} disagrees with SLURM_NTASKS={env['SLURM_NTASKS']}")
        return DistEnv("plain")
    if not 0 <= out.rank < out.world_size or not 0 <= out.local_rank < out.local_world_size:
        raise UserError(f"inconsistent launcher variables: rank {out.rank}, local rank {out.local_rank}, world size {out.world_size}, local world size {out.local_world_size}")
    return out


# --------------------------------------------------------------------------- devices


def resolve_device(requested: str, env: DistEnv) -> torch.device:
    """Pick the device; one-line errors for impossible requests instead of 'invalid device ordinal'."""
    has_cuda = torch.cuda.is_available()
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        requested = "cuda" if has_cuda else ("mps" if has_mps and not env.distributed else "cpu")
    if requested == "cuda":
        if not has_cuda:
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise UserError(f"train.device=cuda but CUDA is not available ({why}); use train.device=cpu or auto")
        visible = torch.cuda.device_count()
        if env.local_world_size > visible:
            cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
            shown = f" (CUDA_VISIBLE_DEVICES={cvd})" if cvd is not None else ""
            raise UserError(f"{env.local_world_size} processes per node but only {visible} visible GPU(s){shown}: lower --nproc/--nproc_per_node or expose more GPUs")
        # LOCAL_RANK indexes the *visible* devices: CUDA_VISIBLE_DEVICES=0,2 makes cuda:1 physical GPU 2.
        return torch.device("cuda", env.local_rank)
    if requested == "mps":
        if not has_mps:
            raise UserError("train.device=mps but MPS is not available on this machine")
        if env.distributed:
            raise UserError("train.device=mps supports a single process only (no MPS backend for torch.distributed)")
        return torch.device("mps")
    return torch.device("cpu")


# --------------------------------------------------------------------------- process group


@dataclass
class Runtime:
    env: DistEnv
    device: torch.device
    backend: Optional[str]
    save_group: Optional[object] = None  # gloo group with a long timeout, for the checkpoint barrier
    store: Optional[object] = None  # this attempt's rendezvous store (launch.processes.hangs trades its records there)


def _rendezvous(cfg, env: DistEnv):
    """Probe and connect to the store, agree on the world (launch.processes.rendezvous), within dist.timeout_s."""
    deadline = time.monotonic() + cfg.dist.timeout_s
    # torchrun hosts the store in its agent (TORCHELASTIC_USE_AGENT_STORE) and so does our
    # spawn parent (LAUNCH_STORE_HOSTED); under srun rank 0 hosts it.
    hosted = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" or os.environ.get("LAUNCH_STORE_HOSTED") == "1"
    store = rendezvous.connect(env, cfg.dist.timeout_s, hosted, deadline)
    # After a torchrun restart the agent's store still holds the previous attempt's keys;
    # a per-attempt prefix keeps the new group from reading stale addresses (pytorch#135712).
    store = dist.PrefixStore(f"launch/attempt_{env.restart_count}", store)
    try:
        rendezvous.join(store, env, deadline, cfg.dist.timeout_s)
    except dist.DistError as e:  # the store went away under us (its host died)
        raise RendezvousError(f"lost the rendezvous store at {env.master_addr}:{env.master_port} while the ranks checked in: {_first_line(e)}") from None
    return store


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def setup(cfg, env: DistEnv) -> Runtime:
    """Bind the device, then (for distributed launchers) create the process group."""
    device = resolve_device(cfg.train.device, env)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before any collective, so NCCL never lands on cuda:0 by accident
    if not env.distributed:
        return Runtime(env, device, None)
    backend = cfg.dist.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise UserError("dist.backend=nccl needs CUDA devices; use dist.backend=gloo (or auto) on CPU")
    timeout = datetime.timedelta(seconds=cfg.dist.timeout_s)
    store = _rendezvous(cfg, env)
    hangs.enable_flight_recorder()
    try:
        dist.init_process_group(
            backend=backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
        save_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=cfg.ckpt.barrier_timeout_s))
    except RuntimeError as e:  # every rank checked in, but the backend's own connections failed
        raise RendezvousError(
            f"the {backend} process group did not form within dist.timeout_s={cfg.dist.timeout_s:g} ({_first_line(e)}): "
            "check that the nodes reach each other on the interface the backend picks (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME)"
        ) from None
    return Runtime(env, device, backend, save_group, store)


def teardown(rt: Runtime) -> None:
    """Normal exit only: destroy_process_group is collective and can hang on an error path."""
    if rt.env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op for a single plain process)."""
    if rt.env.distributed and rt.env.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_to_main(obj, rt: Runtime) -> Optional[list]:
    """Every rank's `obj` as a list on rank 0 (None elsewhere), over the gloo side group: picklable
    objects of the launcher's own (RNG states), never user data."""
    if not (rt.env.distributed and rt.env.world_size > 1):
        return [obj]
    out = [None] * rt.env.world_size if rt.env.is_main else None
    dist.gather_object(obj, out, dst=0, group=rt.save_group)
    return out


def save_barrier(rt: Runtime) -> None:
    """All ranks wait here while rank 0 writes a checkpoint (long timeout, gloo)."""
    if rt.env.distributed and rt.env.world_size > 1:
        dist.barrier(group=rt.save_group)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def print0(*args, rt: Optional[Runtime] = None, **kwargs) -> None:
    if rt is None or rt.env.is_main:
        print(*args, **kwargs, flush=True)


def describe(rt: Runtime) -> str:
    e = rt.env
    where = f"{e.master_addr}:{e.master_port}" if e.distributed else "-"
    return (
        f"launcher={e.launcher} rank={e.rank} local_rank={e.local_rank} world_size={e.world_size} "
        f"host={socket.gethostname()} device={rt.device} backend={rt.backend or 'none'} master={where} "
        f"restart={e.restart_count} pid={os.getpid()}"
    )


def rank_table(rt: Runtime) -> list[str]:
    """describe() of every rank, gathered (over the gloo side group, so no GPU memory is involved)."""
    line = describe(rt)
    if not (rt.env.distributed and rt.env.world_size > 1):
        return [line]
    lines = [None] * rt.env.world_size
    dist.all_gather_object(lines, line, group=rt.save_group)
    return lines


def exit_hard(code: int) -> NoReturn:
    """Leave without running collective teardown; the launcher reaps the peers."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
