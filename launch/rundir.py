"""The run directory's own checks, before anything is written into it.

Not yet here (issue 12, open): one writer at a time. `lock` only creates the directory today; a
second job on a live run directory is not refused yet.
"""

from __future__ import annotations

from pathlib import Path

from launch.errors import UserError


def check_usable(run_dir: Path) -> None:
    """Read-only: the run directory must not be a file."""
    if Path(run_dir).is_file():
        raise UserError(f"run.dir {run_dir} exists and is a file")


class RunLock:
    def release(self) -> None:
        pass


def lock(run_dir: Path) -> RunLock:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return RunLock()
