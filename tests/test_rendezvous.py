"""Issue 17 (points 7 and 9): rendezvous faults and hung collectives are one line each, naming the culprit.

The rendezvous cases start the real entry point with the variables a launcher would set, pointed at
servers this test runs on 127.0.0.1: nothing listening, a full accept queue (the kernel drops the
connection attempts, as a firewall would), a black hole (accepts, never answers), the wrong service
(answers like a web server), a port in use, and two ranks that disagree on the world size. Each process must exit 2 within dist.timeout_s plus a few seconds with exactly one stderr line
naming 127.0.0.1:PORT and the problem. The collective case is a real `--nproc 2` job in which rank 1
calls an extra collective: both ranks must name the collective and its number, and keep the flight
record in the run directory.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time

import pytest

from launch.errors import EXIT_HANG, EXIT_USAGE
from tests.helpers import PY, ROOT, SMALL, env, output, spawn

TIMEOUT_S = 5  # dist.timeout_s of every job here
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LAUNCH_LAUNCHER",
                 "LAUNCH_STORE_HOSTED", "LAUNCH_PARENT_PID", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE")


class Server:
    """A TCP server on 127.0.0.1 that plays a fault: 'hole' accepts and never answers, 'http'
    answers whatever it gets like a web server, 'in_use' listens and never accepts (it only holds
    the port), 'closed' is bound but not listening (connections are refused), 'drop' has a full
    accept queue (the kernel then drops new connection attempts, as a firewall would)."""

    def __init__(self, kind: str):
        self.kind, self.first_contact = kind, None
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        if kind != "closed":
            self.sock.listen(0 if kind == "drop" else 8)
        if kind == "drop":  # one connection nobody accepts fills the queue
            self.held.append(socket.create_connection(("127.0.0.1", self.port), timeout=5))
        if kind in ("hole", "http"):
            threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.first_contact = self.first_contact or time.monotonic()
            self.held.append(conn)  # the hole keeps every connection open, unanswered
            if self.kind == "http":
                try:
                    conn.recv(64)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                except OSError:
                    pass

    def close(self) -> None:
        for c in self.held:
            c.close()
        self.sock.close()


def worker_env(style: str, rank: int, world: int, port: int) -> dict:
    """What srun (SLURM_*) or torchrun (RANK/WORLD_SIZE/...) would give one worker, set by hand."""
    e = env()
    for var in LAUNCHER_VARS:
        e.pop(var, None)
    for var in [v for v in e if v.startswith("SLURM_")]:
        e.pop(var)
    e.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if style == "srun":
        e.update(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS=str(world), SLURM_NNODES="1", SLURM_JOB_ID="4242")
    else:  # a torchrun worker; the test itself hosts the store, as torchrun's agent would
        e.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), TORCHELASTIC_USE_AGENT_STORE="True")
    return e


def start_worker(run_dir, worker: dict) -> subprocess.Popen:
    args = [PY, "train_ddp.py", *SMALL, f"run.dir={run_dir}", f"dist.timeout_s={TIMEOUT_S}"]
    proc = subprocess.Popen(args, cwd=ROOT, env=worker, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.started = time.monotonic()
    return proc


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S + 90)  # a hang guard, far above the bound asserted below
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    p = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    p.wall, p.ended = time.monotonic() - proc.started, time.monotonic()
    return p


def one_line(p: subprocess.CompletedProcess) -> str:
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, output(p)
    return lines[0]


# The single-process cases run at once (each mostly waits for its timeout); each test reads its own.
CASES = {
    "nothing listening": ("closed", 1, r"nothing is listening at 127\.0\.0\.1:{port} .*rank 0 hosts the store"),
    "packets dropped": ("drop", 1, r"no answer from 127\.0\.0\.1:{port} within dist\.timeout_s=5: the connection attempt timed out"),
    "black hole": ("hole", 1, r"127\.0\.0\.1:{port} accepted the connection but never answered within dist\.timeout_s=5"),
    "wrong service": ("http", 1, r"127\.0\.0\.1:{port} answered b'HTTP/1\.1 400.*not the torch store protocol"),
    "port in use": ("in_use", 0, r"cannot host the rendezvous store: port {port} is already in use .*127\.0\.0\.1:{port}.*MASTER_PORT"),
}


@pytest.fixture(scope="module")
def rendezvous_runs(tmp_path_factory):
    servers, procs = {}, {}
    for case, (kind, rank, _) in CASES.items():
        servers[case] = Server(kind)
        run_dir = tmp_path_factory.mktemp("run")
        procs[case] = start_worker(run_dir, worker_env("srun", rank, 2, servers[case].port))
    results = {case: finish(proc) for case, proc in procs.items()}
    yield servers, results
    for s in servers.values():
        s.close()


@pytest.mark.parametrize("case", list(CASES))
def test_a_rendezvous_fault_is_one_line_naming_the_address_within_the_timeout(rendezvous_runs, case):
    servers, results = rendezvous_runs
    server, p = servers[case], results[case]
    kind, rank, pattern = CASES[case]
    assert p.returncode == EXIT_USAGE, output(p)
    line = one_line(p)
    assert line.startswith(f"error: rank {rank}: "), line
    assert re.search(pattern.format(port=server.port), line), line
    assert "Traceback" not in p.stderr and p.stdout == "", output(p)
    # Timed from what the process did first where that is observable (its first connection), so a
    # slow start-up on a loaded machine is not counted; the refused and in-use cases from the launch.
    since = server.first_contact if kind == "hole" else p.ended - p.wall
    assert p.ended - since < TIMEOUT_S + 10, f"{case}: took {p.ended - since:.1f}s"


def test_ranks_with_different_world_sizes_both_say_so_at_once(tmp_path):
    import datetime

    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=30))
    a = start_worker(tmp_path / "a", worker_env("torchrun", 0, 2, store.port))
    b = start_worker(tmp_path / "b", worker_env("torchrun", 1, 3, store.port))
    for rank, p in ((0, finish(a)), (1, finish(b))):
        assert p.returncode == EXIT_USAGE, output(p)
        line = one_line(p)
        assert line.startswith(f"error: rank {rank}: "), line
        assert f"127.0.0.1:{store.port}" in line and "world size" in line, line
        assert "WORLD_SIZE=2" in line and "WORLD_SIZE=3" in line, line
        # neither waits for the timeout: the one that disagrees says so, the other reads its note
        assert p.wall < TIMEOUT_S + 30, f"rank {rank} took {p.wall:.1f}s"


def test_ranks_calling_different_collectives_name_the_collective_and_its_number(tmp_path):
    """Rank 1 calls an extra barrier before step 3 while rank 0 goes on to DDP's gradient all-reduce."""
    mark = tmp_path / "faulted_at"
    run_dir = tmp_path / "run"
    p = spawn(2, run_dir, f"dist.timeout_s={TIMEOUT_S}", "train.epochs=3", LAUNCH_FAULT="mismatch:step=3:rank=1",
              LAUNCH_FAULT_MARK=mark, timeout=180)
    ended = time.time()
    assert p.returncode == EXIT_HANG, output(p)
    down = ended - float(mark.read_text())
    assert down < TIMEOUT_S + 15, f"the job took {down:.1f}s to end after the mismatch"
    lines = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 2, output(p)
    seqs = {}
    for rank in (0, 1):
        mine = [line for line in lines if line.startswith(f"error: rank {rank}: collective #")]
        assert len(mine) == 1, output(p)
        m = re.match(rf"error: rank {rank}: collective #(\d+) (\w+).* did not complete within the {TIMEOUT_S} s timeout: the ranks called different collectives: #(\d+) ", mine[0])
        assert m, mine[0]
        seqs[rank] = int(m.group(3))
        assert "barrier on rank 1" in mine[0] and "all_reduce" in mine[0], mine[0]
        assert f"{run_dir / 'hang' / f'rank{rank}.json'}" in mine[0], mine[0]
        dump = json.loads((run_dir / "hang" / f"rank{rank}.json").read_text())
        ops = {e["collective_seq_id"]: e["profiling_name"] for e in dump["entries"]}
        assert ops[seqs[rank]].endswith("barrier" if rank == 1 else "all_reduce"), ops
    assert seqs[0] == seqs[1], lines  # both name the same first difference
    assert "Traceback" not in p.stderr, output(p)


def entry(seq: int, op: str, sizes=(), done=True, pg="default_pg") -> dict:
    return {"pg": pg, "seq": seq, "op": op, "sizes": [list(s) for s in sizes], "done": done, "timeout_ms": 5000}


def test_the_hang_line_names_the_ranks_that_did_not_arrive():
    """The cases the mismatch job does not reach, from summaries as the ranks trade them: a rank
    that is behind (it posted, its last collective is older) and one that never posted."""
    from launch.processes.hangs import describe

    mine = [entry(6, "all_reduce", [[4]]), entry(7, "all_reduce", [[4]], done=False)]
    line = describe(0, mine, {1: [entry(6, "all_reduce", [[4]])], 2: None, 3: mine})
    assert line.startswith("rank 0: collective #7 all_reduce [4] did not complete within the 5 s timeout: did not arrive: "), line
    assert "rank 1 (its last: #6)" in line and "rank 2 (no answer" in line and "rank 3" not in line, line
    # another group's numbers do not count as this group's
    assert "rank 1 (no collective yet)" in describe(0, mine, {1: [entry(9, "barrier", pg="1")]})
