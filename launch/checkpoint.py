"""Atomic full-state checkpoints, written by rank 0 only, and finding the one to resume from.

Layout: <run dir>/checkpoints/step_00000120.pt plus `latest`, a one-line text file naming
the newest complete checkpoint. A checkpoint counts only once `latest` names it (the commit
marker): the file is written under a temporary name, flushed and fsynced, renamed with
os.replace, the directory fsynced, and only then is `latest` replaced the same way. A kill
at any instant therefore leaves the previous checkpoint and pointer intact.

Checkpoints hold only tensors and plain Python types, so every load here uses
torch.load(weights_only=True): a file carrying a pickled object is refused, never executed.
"""

from __future__ import annotations

import os
import pickle
import re
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from launch.errors import UserError

FORMAT = "launch-checkpoint/1"
LATEST = "latest"


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_path(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:08d}.pt"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable, before_rename: Optional[Callable] = None) -> None:
    """Write via `write(fileobj)` to a temporary name in the same directory, fsync, then rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()  # test hook: a kill here must leave no file under the final name
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


# --------------------------------------------------------------------------- save


def save(state: dict, run_dir: Path, step: int, keep_last: int, before_rename: Optional[Callable] = None) -> Path:
    """Rank 0 only. Write step_XXXXXXXX.pt atomically, then move the `latest` marker, then prune."""
    ckdir = checkpoint_dir(run_dir)
    ckdir.mkdir(parents=True, exist_ok=True)
    path = step_path(run_dir, step)
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f), before_rename)
    atomic_write_text(ckdir / LATEST, path.name + "\n")
    prune(ckdir, keep_last)
    return path


def prune(ckdir: Path, keep_last: int) -> None:
    marked = read_latest(ckdir)
    files = sorted(ckdir.glob("step_*.pt"))
    for old in files[:-keep_last]:
        if old.name != marked:
            old.unlink(missing_ok=True)


def clean_temporaries(run_dir: Path) -> None:
    """Remove temporary files a killed writer left behind (they never carry a final name)."""
    for tmp in checkpoint_dir(run_dir).glob(".*.tmp-*"):
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- load


def read_latest(ckdir: Path) -> Optional[str]:
    try:
        name = (Path(ckdir) / LATEST).read_text().strip()
    except OSError:
        return None
    return name or None


def _torch_load(path: Path):
    """torch.load with weights_only=True on the CPU; every failure becomes one CheckpointError line."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:  # weights_only=True stopped at a global: a class or function the file wanted to call
            raise CheckpointError(
                f"checkpoint {path}: refused: it contains a pickled Python object ({found.group(1)}), not only tensors; it was not executed"
            ) from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"checkpoint {path}: unreadable (truncated or not a torch file: {first})") from None
    except Exception as e:  # the unpickler and zip reader raise many kinds on garbage (IndexError, KeyError, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"checkpoint {path}: unreadable (truncated or not a torch file: {first})") from None


def load(path: Path) -> dict:
    """Load one full checkpoint on the CPU (map_location: rank r never touches cuda:0), or raise CheckpointError."""
    path = Path(path)
    state = _torch_load(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: not a launch checkpoint (no '{FORMAT}' format marker)")
    return state


def load_weights(path: Path) -> tuple[dict, Optional[dict]]:
    """Weights from a full checkpoint or a bare state_dict (model.pt). Returns (state_dict, checkpoint or None)."""
    path = Path(path)
    state = _torch_load(path)
    if isinstance(state, dict) and state.get("format") == FORMAT:
        return state["model"], state
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path}: neither a launch checkpoint nor a state_dict of tensors")
    return state, None


def find_resumable(run_dir: Path, warn: Callable[[str], None]) -> Optional[tuple[Path, dict]]:
    """The newest committed checkpoint that loads; fall back to older ones, saying so.
    Files newer than `latest` were never committed and are ignored."""
    ckdir = checkpoint_dir(run_dir)
    marked = read_latest(ckdir)
    files = sorted(ckdir.glob("step_*.pt"), reverse=True)
    if marked is None and not files:
        return None
    if marked is not None:
        files = [f for f in files if f.name <= marked]
        if not (ckdir / marked).exists():
            warn(f"checkpoint pointer {ckdir / LATEST} names {marked}, which is missing; trying older checkpoints")
    problems = []
    for f in files:
        try:
            return f, load(f)
        except CheckpointError as e:
            problems.append(str(e))
            warn(f"{e}; falling back to the previous checkpoint")
    raise CheckpointError(f"no usable checkpoint in {ckdir} ({len(problems)} tried); use ckpt.resume=never to start fresh")


def move_aside(run_dir: Path) -> Optional[Path]:
    """For ckpt.resume=never: keep old checkpoints (renamed), never delete them."""
    ckdir = checkpoint_dir(run_dir)
    if not ckdir.exists() or not any(ckdir.iterdir()):
        return None
    target = ckdir.with_name(f"checkpoints.old-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.replace(ckdir, target)
    return target
