"""The rendezvous: reach the store at MASTER_ADDR:MASTER_PORT, check who answers, agree on the world.

torch's own client, pointed at the wrong place, either hangs (a port that accepts and never
answers), retries past its timeout, or ends in a wall of C++ text. Here every rank first probes the
address itself, with one deadline (`dist.timeout_s`) for the whole rendezvous, and every failure is
one line naming the address, the problem and what to check (RendezvousError: exit 2, printed by
every rank that fails, since each may see something different):

- nothing listening (connection refused until the deadline; retried, since under srun rank 0 may
  start its store after the others start connecting);
- no answer to the connection attempt (a firewall dropping packets, a host that is down);
- a black hole: the port accepts the connection but never answers the store's greeting;
- the wrong service: the port answers with bytes that are not the store protocol;
- the port is in use (rank 0 under srun cannot listen on MASTER_PORT);
- ranks started with different world sizes, or two processes claiming one rank.

The probe speaks the first exchange of torch's TCPStore client (torch 2.13, observed on the wire):
VALIDATE (query 0) with the magic number 0x3C85F7CE, then PING (query 13) with a 4-byte nonce,
which the store echoes (PING exists since torch 2.3; the query numbers only ever grew at the end).
Every distributed test runs through it, so a torch that changes this exchange fails the suite at
once; LAUNCH_STORE_PROBE=0 skips the probe (torch's own client then connects, with its own errors).
"""

from __future__ import annotations

import datetime
import os
import socket
import struct
import time

import torch.distributed as dist

from launch.errors import UserError

_VALIDATE, _PING, _MAGIC = 0, 13, 0x3C85F7CE
_RETRY_S = 0.2  # between connection attempts while nothing listens yet


class RendezvousError(UserError):
    """A rendezvous problem: one line, exit 2, printed by every rank that meets it (not only rank 0)."""


def _greeting(nonce: int) -> bytes:
    return struct.pack("<BI", _VALIDATE, _MAGIC) + struct.pack("<BI", _PING, nonce)


def _host_hint(launcher: str) -> str:
    """Who is supposed to be listening, so the line says where to look."""
    return {
        "slurm": "under srun rank 0 hosts the store there: check that rank 0 started, that MASTER_ADDR names its host and that every rank has the same MASTER_PORT",
        "torchrun": "the torchrun agent hosts the store there: check --master-addr/--master-port (or --rdzv-endpoint) on every node",
        "spawn": "the --nproc parent hosts the store there: check that it is still running",
    }.get(launcher, "check MASTER_ADDR and MASTER_PORT")


def _answer(sock: socket.socket, nonce: int, deadline: float, waited: str) -> str | None:
    """Send the greeting; None if a store answered, else what answered instead (for the line)."""
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    sock.sendall(_greeting(nonce))
    got = b""
    try:
        while len(got) < 4:
            chunk = sock.recv(4 - len(got))
            if not chunk:
                return "closed the connection without answering the store's greeting (it is not a torch store)" if not got else f"answered {got!r}, which is not the store protocol"
            got += chunk
    except socket.timeout:
        if got:
            return f"answered {got!r} and then nothing {waited}, which is not the store protocol (another service holds the port)"
        return f"accepted the connection but never answered {waited} (a black hole: another program holds the port, or a firewall swallows the traffic)"
    if struct.unpack("<I", got)[0] == nonce:
        return None
    sock.settimeout(0.2)  # a little more of the reply, so the line shows what kind of service it is
    try:
        got += sock.recv(60)
    except OSError:
        pass
    return f"answered {got[:48]!r}, not the torch store protocol (another service holds the port)"


def probe(addr: str, port: int, deadline: float, launcher: str, timeout_s: float) -> None:
    """Return once a torch store answers at addr:port; raise RendezvousError (one line) otherwise."""
    where = f"{addr}:{port}"
    check = "check MASTER_ADDR/MASTER_PORT"
    waited = f"within dist.timeout_s={timeout_s:g}"
    try:
        socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise RendezvousError(f"cannot resolve the rendezvous address {addr!r} ({e.strerror or e}); check MASTER_ADDR") from None
    last = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            with socket.create_connection((addr, port), timeout=left) as sock:
                what = _answer(sock, int.from_bytes(os.urandom(2), "little") + 1, deadline, waited)
        except socket.timeout:
            raise RendezvousError(f"no answer from {where} {waited}: the connection attempt timed out (host down or unreachable, or a firewall drops the packets); {check}") from None
        except ConnectionRefusedError:
            last = "refused"
        except OSError as e:  # unreachable network or host: may come back (a node still booting)
            last = e.strerror or str(e)
        else:
            if what is None:
                return
            raise RendezvousError(f"{where} {what}; {check}")
        time.sleep(min(_RETRY_S, max(0.0, deadline - time.monotonic())))
    if last == "refused":
        raise RendezvousError(f"nothing is listening at {where} (connection refused for dist.timeout_s={timeout_s:g}): {_host_hint(launcher)}")
    raise RendezvousError(f"cannot reach {where} {waited} ({last or 'timed out'}); {check} and the network between the nodes")


def connect(env, timeout_s: float, hosted: bool, deadline: float):
    """The TCPStore of this job: rank 0 hosts it under srun, everybody else is a probed client."""
    where = f"{env.master_addr}:{env.master_port}"
    timeout = datetime.timedelta(seconds=timeout_s)
    is_master = env.rank == 0 and not hosted
    if not is_master and os.environ.get("LAUNCH_STORE_PROBE", "1") != "0":  # 0: a torch whose store speaks otherwise
        probe(env.master_addr, env.master_port, deadline, env.launcher, timeout_s)
    try:
        # wait_for_workers=False: `join` waits for the ranks itself, with a line that counts them.
        return dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=is_master, timeout=timeout, multi_tenant=not hosted, wait_for_workers=False)
    except (RuntimeError, OSError) as e:
        text = str(e)
        if is_master and ("EADDRINUSE" in text or "address already in use" in text):
            raise RendezvousError(f"cannot host the rendezvous store: port {env.master_port} is already in use on this host ({where}); pick another MASTER_PORT (or unset it: the default is derived from SLURM_JOB_ID)") from None
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        raise RendezvousError(f"cannot reach the rendezvous store at {where}: {first}") from None


def join(store, env, deadline: float, timeout_s: float) -> None:
    """Every rank checks in with its world size and rank; returns when all `world_size` have.
    The first rank to check in sets the world size; a rank that disagrees (or a second process
    with a rank already taken) leaves a note that the waiting ranks read, so all of them end with
    one line at once instead of at the timeout."""
    where = f"{env.master_addr}:{env.master_port}"
    mine = f"{env.world_size} {env.rank}"
    first = store.compare_set("launch/world_size", "", mine).decode()
    if first != mine and first.split()[0] != str(env.world_size):
        world, rank = first.split()
        note = f"rank {rank} was started with WORLD_SIZE={world}, rank {env.rank} with WORLD_SIZE={env.world_size}"
        _abort(store, note)
        raise RendezvousError(f"the ranks disagree on the world size at {where} ({note}): start every rank with the same world size (srun --ntasks, torchrun --nnodes/--nproc_per_node, WORLD_SIZE)")
    me = f"{socket.gethostname()} pid {os.getpid()}"
    holder = store.compare_set(f"launch/rank_{env.rank}", "", me).decode()
    if holder != me:
        note = f"rank {env.rank} is claimed by two processes ({holder} and {me})"
        _abort(store, note)
        raise RendezvousError(f"{note} at {where}: each process needs its own RANK (check SLURM_PROCID/RANK)")
    joined, pause = store.add("launch/joined", 1), 0.01
    while joined < env.world_size:
        if store.check(["launch/abort"]):
            note = store.get("launch/abort").decode()
            raise RendezvousError(f"the rendezvous at {where} failed: {note}; start every rank with the same world size and its own rank")
        if time.monotonic() > deadline:
            raise RendezvousError(f"only {joined} of {env.world_size} ranks reached the store at {where} within dist.timeout_s={timeout_s:g}: check that every rank started, with the same MASTER_ADDR/MASTER_PORT and WORLD_SIZE")
        time.sleep(pause)
        pause = min(pause * 1.5, 0.2)  # quick for a few ranks, gentle on the store for thousands
        joined = store.add("launch/joined", 0)


def _abort(store, note: str) -> None:
    try:
        store.set("launch/abort", note)
    except Exception:  # the store itself is going away: the waiting ranks time out with their own line
        pass
