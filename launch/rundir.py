"""One writer per run directory (placeholder API; the full version lands with the field branch)."""

from __future__ import annotations

from pathlib import Path

from launch.errors import UserError


def check_usable(run_dir: Path) -> None:
    if Path(run_dir).is_file():
        raise UserError(f"run.dir {run_dir} exists and is a file")


class RunLock:
    def release(self) -> None:
        pass


def lock(run_dir: Path) -> RunLock:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return RunLock()
