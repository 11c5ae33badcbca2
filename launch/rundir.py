"""The run directory: usable before anything is written, and one writer at a time.

- `check_usable` (every rank, before the data is built): run.dir must not be a file, and it must be
  possible to create and write it. It probes with a temporary directory that it removes at once, so
  a bad run.dir is one line before any file exists; root, for whom permission bits mean little,
  gets the same answer as anyone else.
- `lock` (rank 0, before the first write): an exclusive `flock` on `<run dir>/.lock`, held for the
  life of the process. A second job on a live run directory is refused in one line naming the holder
  (host, pid, start time). The kernel drops the lock when the holder dies, however it dies, so a
  crashed or killed job never blocks its rerun. On filesystems where flock is not shared between
  hosts (some NFS setups), two hosts can each get "the" lock: use a run.dir per job there.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path

from launch.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no flock; the lock is a no-op there
    fcntl = None


def check_usable(run_dir: Path) -> None:
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise UserError(f"run.dir {run_dir} exists and is a file; give a directory")
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"run.dir {run_dir} cannot be created: {existing} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".launch-probe-", dir=existing))
    except OSError as e:
        what = "is not writable" if existing == run_dir else f"cannot be created under {existing}"
        raise UserError(f"run.dir {run_dir} {what}: {e.strerror or e}") from None


class RunLock:
    def __init__(self, fd=None):
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None

    __del__ = release  # a run set up and abandoned in one process (tests) must not keep it


def lock(run_dir: Path) -> RunLock:
    """Take <run dir>/.lock, or raise UserError naming the live job that holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        return RunLock()
    path = run_dir / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown holder"
        os.close(fd)
        raise UserError(f"run directory {run_dir} is in use by a live job ({holder}); wait for it, stop it (touch {run_dir}/STOP), or use another run.dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    return RunLock(fd)
