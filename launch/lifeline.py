"""Workers die with the process that launched them.

torchrun starts its workers in sessions of their own, so when the agent is killed with SIGKILL (a
closed terminal, the OOM killer, a scheduler) nothing else reaches them: they would be reparented to
init and keep training and writing checkpoints beside the job's next attempt. On Linux each worker
asks the kernel for SIGKILL when its parent dies (PR_SET_PDEATHSIG). Only workers under a launcher
(torchrun, --nproc, srun) do this: a plain `python train_single.py` started from a script that
exits must keep running.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent() -> bool:
    """Arm the parent-death signal; exit at once if the parent is already gone. True if armed."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if parent == 1 or os.getppid() != parent:  # the launcher died before the signal was armed
        os._exit(128 + signal.SIGKILL)
    return True
