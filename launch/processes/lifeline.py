"""Workers die with their launcher: no orphan keeps training after `kill -9` of torchrun or `--nproc`.

torchrun starts each worker in a session of its own, so killing the agent (or its process group)
does not reach the workers: they are reparented to init and keep training and writing checkpoints
into a run directory that a rerun then shares with them. `die_with_parent` asks the kernel to
SIGKILL this process when its parent goes (Linux PR_SET_PDEATHSIG).

PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process. Both
launchers fork from a main thread that lives as long as they do (torch 2.13): torchrun's agent
runs `agent.run()` in its main thread and starts workers with `subprocess.Popen` there
(elastic/multiprocessing/subprocess_handler); `--nproc` workers are forked by a forkserver
(single-threaded), which itself dies with the `--nproc` parent (launch.processes.server), so a
kill -9 of the parent takes the server and then every worker down.

The race where the parent died before the prctl call: the parent pid is taken as early as
possible, from LAUNCH_PARENT_PID (set by the `--nproc` parent for its server, and by each forked
worker as its first act) or else when this module is imported (launch.processes.entry imports it
first, before torch), and compared after the prctl. A worker orphaned even earlier cannot join the
job either: torchrun's agent and the `--nproc` parent host the rendezvous store, so it fails to
connect and exits.
"""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1
PARENT_ENV = "LAUNCH_PARENT_PID"

_PARENT_AT_IMPORT = os.getppid()


def expected_parent() -> int:
    """The launcher's pid: LAUNCH_PARENT_PID when set, else the parent seen at import."""
    value = os.environ.get(PARENT_ENV, "")
    return int(value) if value.isdigit() else _PARENT_AT_IMPORT


def die_with_parent(parent: int = 0) -> None:
    """Have the kernel SIGKILL this process when its parent (pid `parent`, default the launcher) dies;
    leave at once if it already has. Linux only; a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        print(f"warning: prctl(PR_SET_PDEATHSIG) failed ({os.strerror(err)}); this worker will not die with its launcher", file=sys.stderr, flush=True)
        return
    expected = parent or expected_parent()
    if os.getppid() != expected:  # the parent died before the prctl: nobody will signal us
        print(f"error: the launcher (pid {expected}) is gone; this worker stops", file=sys.stderr, flush=True)
        os._exit(128 + signal.SIGKILL)


def loader_worker_dies_with(rank_pid: int, worker_id: int) -> None:
    """DataLoader worker_init_fn: a forked worker holds copies of its rank's sockets, so a rank killed
    with -9 would look alive to its peers until its workers noticed (up to 5 s). They die with it."""
    die_with_parent(rank_pid)


# --------------------------------------------------------------------------- descriptors forked children must not keep

_parent_only: set[int] = set()


def parent_only(fd: int) -> None:
    """Close `fd` in every process forked from this one (DataLoader workers): the run directory's lock
    and the trackers' pipe belong to this process alone; a worker holding a copy would keep the lock
    taken, or the pipe open, after this process is gone."""
    _parent_only.add(fd)


def forget(fd: int) -> None:
    """`fd` is about to be closed by its owner."""
    _parent_only.discard(fd)


def _close_in_child() -> None:
    for fd in list(_parent_only):
        try:
            os.close(fd)
        except OSError:
            pass
    _parent_only.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)
