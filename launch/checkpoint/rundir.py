"""The run directory: checks before anything is built, one writer at a time, room for the first save.

`check_usable` runs on every rank before anything is built and leaves nothing behind. `lock` runs on
rank 0 before anything is written: an exclusive `flock` on `run_dir/.lock`, held until the process
ends. The kernel drops it when the holder dies, however it dies (kill -9 included), so a lock left
by a dead job never blocks a rerun; the file's text ("host pid started-at") only names the holder
in the error. A filesystem that refuses flock (some NFS/Lustre mounts) gets a warning and no lock.

`check_checkpoint_room` runs on rank 0 under the lock before the first step: everything the first
save needs (a writable checkpoints/, free space and a file size limit for one checkpoint), so a
run never trains for hours to fail at its first save. `move_previous_run` is ckpt.resume=never:
the previous run's files go into one `previous-<time>/` folder, never replaced or deleted.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from launch.checkpoint.integrity import cause, fsync_dir, stamp, unused
from launch.errors import UserError
from launch.processes import lifeline

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_NAME = ".lock"
# What a run writes into its directory (ckpt.resume=never moves these, and only these: run.dir may
# be a folder that holds other things too).
RUN_FILES = ("config.yaml", "metrics.jsonl", "model.pt", "model.manifest.json", "checkpoints", "tb", "profile", "curves.png",
             "trackers.json", "trackers.log", "wandb", "mlflow.db", "mlartifacts")  # the trackers: launch.observe.trackers
RUN_PATTERNS = ("config.yaml.*", "metrics.jsonl.*", "model.pt.*", "model.manifest.json.*", "checkpoints.old-*")


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def check_usable(run_dir: Path) -> None:
    """Raise a one-line UserError when run.dir cannot be used; leaves nothing behind."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise UserError(f"run.dir {run_dir} exists and is a file")
    base = _nearest_existing(run_dir.absolute())
    if not base.is_dir():
        raise UserError(f"run.dir {run_dir}: {base} is not a directory")
    action = "write into" if base == run_dir.absolute() else f"create {run_dir} under"
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"run.dir {run_dir}: cannot {action} {base} ({_why_unwritable(base)})")
    # Permission bits do not tell root (or a special filesystem such as /proc) the truth: try it,
    # with a temporary directory removed at once, so nothing is left behind.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".launch-probe-", dir=base))
    except OSError as e:
        raise UserError(f"run.dir {run_dir}: cannot {action} {base} ({e.strerror or e})") from None


def _why_unwritable(path: Path) -> str:
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "read-only filesystem"
    except (OSError, AttributeError):
        pass
    return "permission denied"


class RunLock:
    """Holds the run directory's lock until `release()` or the end of the process."""

    def __init__(self, fd: Optional[int] = None, path: Optional[Path] = None):
        self.fd, self.path = fd, path
        self.before_release: list = []  # called first, however the job ends (the trackers' finish: launch.observe.logger)

    def still_ours(self) -> bool:
        """False once the run directory was removed or replaced under this job: its lock file is gone,
        or the path now names another file (`rm -rf` and a new job there). The lock only guards the
        file it was taken on, so without this check the old job would write into the new directory."""
        if self.fd is None:  # no lock (flock unsupported): nothing to compare
            return True
        try:
            now = os.stat(self.path)
        except OSError:
            return False
        held = os.fstat(self.fd)
        return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)

    def release(self) -> None:
        while self.before_release:
            self.before_release.pop()()
        if self.fd is not None:
            lifeline.forget(self.fd)
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 512, 0).decode(errors="replace").split()
    except OSError:
        text = []
    if len(text) >= 3:
        return f"host {text[0]}, pid {text[1]}, since {text[2]}"
    return "holder not recorded yet"


def lock(run_dir: Path) -> RunLock:
    """Create run_dir and take its lock (exclusive, non-blocking); UserError naming the live holder."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        return RunLock()
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's line stays readable
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            holder = _holder(fd)
            os.close(fd)
            raise UserError(
                f"run directory {run_dir} is in use by a live job ({holder}); wait for it, stop it, or use another run.dir"
            ) from None
        os.close(fd)
        print(f"warning: cannot lock {path} ({os.strerror(e.errno)}): this filesystem does not support flock; "
              "make sure no other job writes into this run directory", file=sys.stderr, flush=True)
        return RunLock()
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{socket.gethostname()} {os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode(), 0)
    lifeline.parent_only(fd)  # a forked DataLoader worker must not keep the lock
    return RunLock(fd, path)


# --------------------------------------------------------------------------- before the first step


def _size(n: int) -> str:
    return f"{n:,} bytes" + (f" ({n / 2**30:.2f} GiB)" if n >= 2**30 else f" ({n / 2**20:.1f} MiB)" if n >= 2**20 else "")


def check_checkpoint_room(ckdir: Path, needed: int) -> None:
    """Rank 0 under the lock: checkpoints/ exists and takes a file, there is space for one
    checkpoint of about `needed` bytes where the filesystem reports it, and the process's file size
    limit allows one. Each failure is one UserError line, raised before the first step."""
    ckdir = Path(ckdir)
    way_out = "fix it or use another run.dir"
    try:
        ckdir.mkdir(exist_ok=True)
    except FileExistsError:
        pass
    except OSError as e:
        raise UserError(f"cannot create the checkpoint directory {ckdir} ({cause(e)}); {way_out}") from None
    if not ckdir.is_dir():
        raise UserError(f"cannot save checkpoints into {ckdir}: it exists and is not a directory; {way_out}")
    # Permission bits do not tell root (or /proc) the truth: write a byte and fsync, as a save will.
    try:
        probe = ckdir / f".probe.tmp-{os.getpid()}"  # a temporary's name: clean_temporaries removes one a kill left
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"x")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        why = "this filesystem takes no new files" if e.errno == errno.ENOENT else cause(e)  # ENOENT in a directory that exists: /proc, sysfs
        raise UserError(f"cannot write checkpoints into {ckdir} ({why}): the first save would fail; {way_out}") from None
    try:
        st = os.statvfs(ckdir)
    except (OSError, AttributeError):
        st = None
    if st is not None and st.f_blocks and st.f_bavail * st.f_frsize < needed:  # f_blocks 0: no figures (/proc, some FUSE)
        raise UserError(
            f"not enough free space for a checkpoint in {ckdir}: {_size(st.f_bavail * st.f_frsize)} free, "
            f"about {_size(needed)} needed (the model's and optimizer's tensors); free some space or use another run.dir"
        )
    limit = _file_size_limit()
    if limit is not None and limit < needed:
        raise UserError(
            f"the file size limit (ulimit -f) is {_size(limit)}, below the about {_size(needed)} of one checkpoint "
            "(the model's and optimizer's tensors); raise it (ulimit -f unlimited)"
        )


def _file_size_limit() -> Optional[int]:
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def previous_run_files(run_dir: Path) -> list[Path]:
    if not Path(run_dir).is_dir():
        return []
    return sorted(p for p in Path(run_dir).iterdir() if p.name in RUN_FILES or any(fnmatch.fnmatch(p.name, pat) for pat in RUN_PATTERNS))


def move_previous_run(run_dir: Path) -> Optional[Path]:
    """ckpt.resume=never, rank 0 under the lock: move the previous run's files (config, metrics,
    weights, checkpoints, TensorBoard, ...) into `<run dir>/previous-<time>/`. None when there are none."""
    entries = previous_run_files(run_dir)
    if not entries:
        return None
    target = unused(Path(run_dir) / f"previous-{stamp()}")
    try:
        target.mkdir()
        for entry in entries:
            os.replace(entry, target / entry.name)
    except OSError as e:
        raise UserError(f"ckpt.resume=never: cannot move the previous run in {run_dir} aside into {target} ({cause(e)})") from None
    fsync_dir(target)
    fsync_dir(Path(run_dir))
    return target
