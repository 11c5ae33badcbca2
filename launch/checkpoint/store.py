"""Atomic, checksummed full-state checkpoints, written by rank 0 only, and finding the one to resume from.

Layout: <run dir>/checkpoints/step_00000120.pt, its manifest step_00000120.manifest.json
({file: {bytes, sha256}}, launch.checkpoint.integrity) and `latest`, a one-line text file naming the newest
complete checkpoint. A checkpoint counts only once `latest` names it (the commit marker): the file
is written under a temporary name while its bytes are hashed, fsynced, its manifest is written,
the file is renamed with os.replace, the directory fsynced, and only then is `latest` replaced the
same way. A kill at any instant therefore leaves the previous checkpoint and pointer intact.

A load checks the file against its manifest first: a flipped bit or a truncated file is one line
and the resume falls back to the previous checkpoint; the bad file is later set aside (renamed,
never deleted). Files written before manifests existed load unverified.

Checkpoints hold only tensors and plain Python types, so every load here uses
torch.load(weights_only=True): a file carrying a pickled object is refused, never executed.
"""

from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from launch.checkpoint import integrity
from launch.checkpoint.integrity import WriteError, atomic_write, atomic_write_text, manifest_path
from launch.errors import UserError

FORMAT = "launch-checkpoint/1"
SHARDED_STATE = "state.pt"  # inside a sharded checkpoint's directory: everything but the shards
LATEST = "latest"
POINTER = re.compile(r"step_\d{8}\.(pt|dcp)")  # a file, or a sharded checkpoint's directory (launch.parallel.dcp)


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def make_checkpoint_dir(run_dir: Path) -> None:
    """checkpoints/ in the run directory, never the run directory itself: removed under the job (rm -rf),
    a save must not make it again for a new job there to resume from."""
    checkpoint_dir(run_dir).mkdir(exist_ok=True)


def step_path(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:08d}.pt"


# --------------------------------------------------------------------------- save


def _write_checked(path: Path, obj, what: str, before_rename: Optional[Callable] = None, **extra) -> None:
    """torch.save `obj` atomically with its manifest written before the rename, so every file under
    a final name has its checksum. A failed write leaves no manifest of a file that is not there."""

    def seal(record: dict) -> None:
        integrity.write_manifest(manifest_path(path), {path.name: record}, **extra)
        if before_rename is not None:
            before_rename()  # test hook: a kill here must leave no file under the final name

    try:
        atomic_write(path, lambda f: torch.save(obj, f), seal, what=what)
    except BaseException:
        if not path.exists():
            manifest_path(path).unlink(missing_ok=True)
        raise


def save(state: dict, run_dir: Path, step: int, keep_last: int, before_rename: Optional[Callable] = None) -> Path:
    """Rank 0 only. Write step_XXXXXXXX.pt and its manifest, then move the `latest` marker, then prune.
    A failed write is one line naming the file and the cause; the previous checkpoint stays committed."""
    ckdir = checkpoint_dir(run_dir)
    path = step_path(run_dir, step)
    previous = read_latest(ckdir)
    try:
        make_checkpoint_dir(run_dir)
        _write_checked(path, {"format": FORMAT, **state}, "checkpoint", before_rename, checkpoint=path.name, step=step)
    except (WriteError, OSError) as e:
        raise _not_committed(e, path, ckdir, previous) from None
    return commit(path, keep_last, previous)


def _not_committed(e: BaseException, path: Path, ckdir: Path, previous: Optional[str]) -> WriteError:
    msg = str(e) if isinstance(e, WriteError) else f"cannot write checkpoint {path}: {integrity.cause(e)}"
    kept = f"{ckdir / LATEST} still names {previous}" if previous else "no checkpoint was committed"
    return WriteError(f"{msg}; {kept}")


def commit(path: Path, keep_last: int, previous: Optional[str]) -> Path:
    """Rank 0, once `path` (a file or a sharded directory) and its manifest are in place: move the
    `latest` marker to it, then prune."""
    ckdir = path.parent
    try:
        atomic_write_text(ckdir / LATEST, path.name + "\n", what="checkpoint pointer")
    except (WriteError, OSError) as e:
        raise _not_committed(e, path, ckdir, previous) from None
    prune(ckdir, keep_last)
    return path


def save_weights(path: Path, weights: dict) -> None:
    """model.pt: a plain state_dict (torch.load(model.pt) keeps working) with model.manifest.json beside it."""
    _write_checked(Path(path), weights, "weights", checkpoint=Path(path).name)


def committed(ckdir: Path) -> list[Path]:
    """Every checkpoint under a final name, files and sharded directories, oldest first."""
    return sorted([*ckdir.glob("step_*.pt"), *(d for d in ckdir.glob("step_*.dcp") if d.is_dir())], key=lambda p: p.name)


def prune(ckdir: Path, keep_last: int) -> None:
    marked = read_latest(ckdir)
    for old in committed(ckdir)[:-keep_last]:
        if old.name != marked:
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
            manifest_path(old).unlink(missing_ok=True)


def clean_temporaries(run_dir: Path) -> None:
    """Rank 0 under the run directory's lock: remove what a killed writer left behind (temporaries
    never carry a final name; a manifest whose checkpoint was never renamed into place)."""
    ckdir = checkpoint_dir(run_dir)
    for half in ckdir.glob(".step_*.dcp.tmp"):  # a sharded checkpoint a killed job never committed
        shutil.rmtree(half, ignore_errors=True)
    mine = [*ckdir.glob(".*.tmp-*")]  # run.dir may hold the user's files too: only the run's own names there
    for pattern in (".config.yaml.tmp-*", ".model.*.tmp-*", ".metrics.jsonl*.tmp-*"):
        mine += Path(run_dir).glob(pattern)
    for tmp in mine:
        tmp.unlink(missing_ok=True)
    for man in ckdir.glob("step_*.manifest.json"):
        stem = man.name.replace(".manifest.json", "")
        if not (ckdir / f"{stem}.pt").exists() and not (ckdir / f"{stem}.dcp").exists():
            man.unlink(missing_ok=True)


def tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def estimate_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """A checkpoint's tensor bytes: the model's plus the optimizer's state. Before the first step
    that state does not exist yet: count what the optimizer will keep per parameter (Adam-style
    betas: two moments; SGD momentum: one buffer)."""
    weights = tensor_bytes(model.state_dict())
    state = tensor_bytes(list(optimizer.state.values()))
    if not state:
        slots = 2 if "betas" in optimizer.defaults else (1 if optimizer.defaults.get("momentum") else 0)
        state = slots * sum(tensor_bytes(p) for g in optimizer.param_groups for p in g["params"])
    return weights + state


# --------------------------------------------------------------------------- load


def read_pointer(ckdir: Path) -> tuple[Optional[str], Optional[str]]:
    """(the checkpoint name `latest` holds, None) or (None, what is wrong with it). Any bytes at all
    (torn, garbage, not UTF-8) give a reason, never an exception. No file: (None, None)."""
    path = Path(ckdir) / LATEST
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):  # no pointer (checkpoints/ being a file is check_checkpoint_room's to say)
        return None, None
    except OSError as e:
        return None, f"is unreadable ({integrity.cause(e)})"
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, f"is not text ({len(raw)} bytes)"
    if not POINTER.fullmatch(name):
        return None, f"does not name a checkpoint ({name[:40]!r})" if name else "is empty"
    return name, None


def read_latest(ckdir: Path) -> Optional[str]:
    return read_pointer(ckdir)[0]


def _torch_load(path: Path):
    """Verify against the manifest, then torch.load with weights_only=True on the CPU; every
    failure becomes one CheckpointError line."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        integrity.verify(path)
    except integrity.IntegrityError as e:
        raise CheckpointError(f"checkpoint {e}") from None
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
    """Load one full checkpoint on the CPU (map_location: rank r never touches cuda:0), or raise CheckpointError.
    For a sharded checkpoint (a directory) that is its state.pt; the shards are read by the strategy."""
    path = Path(path)
    state = _torch_load(path / SHARDED_STATE if path.is_dir() else path)
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


def _candidates(ckdir: Path, warn: Callable[[str], None]) -> tuple[Optional[str], list[Path]]:
    """(what `latest` names, the checkpoints to try newest first). Files newer than `latest` were
    never committed and are left out; without a usable `latest` every complete file counts (a
    file only gets its final name once it is whole, and its manifest catches any later damage)."""
    marked, problem = read_pointer(ckdir)
    files = committed(ckdir)[::-1]
    if problem:
        warn(f"checkpoint pointer {ckdir / LATEST} {problem}; using the newest complete checkpoint instead")
    if marked is not None:
        files = [f for f in files if f.name <= marked]
        if not (ckdir / marked).exists():
            warn(f"checkpoint pointer {ckdir / LATEST} names {marked}, which is missing; trying older checkpoints")
    return marked, files


def find_resumable(run_dir: Path, warn: Callable[[str], None], verify_dir: Optional[Callable] = None) -> Optional[tuple[Path, dict]]:
    """The newest committed checkpoint that loads; fall back to older ones, saying so. A sharded
    checkpoint's shards are checked by `verify_dir(path)`, collectively (every rank calls this alike)."""
    ckdir = checkpoint_dir(run_dir)
    marked, files = _candidates(ckdir, warn)
    if marked is None and not files:
        return None
    problems = []
    for f in files:
        try:
            state = load(f)
            if f.is_dir():
                (verify_dir or verify_here)(f)
            return f, state
        except CheckpointError as e:
            problems.append(str(e))
            warn(f"{e}; falling back to the previous checkpoint")
    raise CheckpointError(f"no usable checkpoint in {ckdir} ({len(problems)} tried); use ckpt.resume=never to start fresh")


def set_aside_unusable(run_dir: Path, resumed_from: Optional[Path], say: Callable[[str], None]) -> None:
    """Rank 0, under the lock, after find_resumable fell back: rename the committed checkpoints newer
    than the one resumed from (those it refused) to `<name>.corrupt-<time>`, with their manifests.
    Kept for inspection; the rerun will save those steps again under the same names."""
    ckdir = checkpoint_dir(run_dir)
    if resumed_from is None or Path(resumed_from).parent != ckdir:
        return
    marked = read_latest(ckdir)
    for f in committed(ckdir):
        if f.name <= Path(resumed_from).name or (marked is not None and f.name > marked):
            continue
        try:
            load(f)
            if f.is_dir():
                verify_here(f)
            continue  # it loads now (it was not refused): leave it
        except CheckpointError:
            pass
        moved = integrity.set_aside(f, "corrupt")
        integrity.set_aside(manifest_path(f), "corrupt")
        say(f"kept the unusable checkpoint {f.name} as {moved} (a rerun saves step {int(f.stem[5:])} again)")


def verify_here(path: Path) -> None:
    """A sharded checkpoint verified by this process alone (every file's sha256)."""
    try:
        if not integrity.verify(path):
            raise CheckpointError(f"checkpoint {path}: no manifest (a sharded checkpoint that was never committed)")
    except integrity.IntegrityError as e:
        raise CheckpointError(f"checkpoint {e}") from None
