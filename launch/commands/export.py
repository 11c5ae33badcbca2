"""`launch export RUN_DIR|CHECKPOINT [STEP] [-o OUT]`: one plain state dict from any checkpoint.

A sharded checkpoint (dist.strategy=fsdp: `checkpoints/step_XXXXXXXX.dcp/`, one file per rank) becomes
the model's whole state dict, in this process alone and without building the model: the shapes come
from the checkpoint's metadata (read by the launcher's safe reader: nothing pickled runs). A full
checkpoint gives its `model` entry. The output is what `model.pt` is: `torch.load(OUT, weights_only=True)`
and `model.load_state_dict(...)`, `launch predict OUT --config RUN/config.yaml`. The file is verified
against its manifest first, and the output gets a manifest of its own.
"""

from __future__ import annotations

from pathlib import Path

from launch.checkpoint import store
from launch.errors import UserError


def add_arguments(p) -> None:
    p.add_argument("source", metavar="RUN_DIR|CHECKPOINT", help="a run directory (its newest committed checkpoint) or a checkpoint (file or .dcp directory)")
    p.add_argument("step", nargs="?", type=int, help="with a run directory: the checkpoint of this optimizer step instead of the newest")
    p.add_argument("--output", "-o", help="the state dict to write (default: <run dir>/model.step_XXXXXXXX.pt, beside the checkpoint's run)")


def resolve(source: str, step=None) -> Path:
    p = Path(source)
    if p.is_dir() and p.suffix != ".dcp":
        ckdir = store.checkpoint_dir(p)
        found = [c for c in store.committed(ckdir) if step is None or int(c.stem[5:]) == step]
        latest = store.read_latest(ckdir)
        if step is None and latest and (ckdir / latest).exists():
            return ckdir / latest
        if not found:
            raise UserError(f"{source}: no checkpoint" + (f" of step {step}" if step is not None else "") + f" in {ckdir}")
        return found[-1]
    if not p.exists():
        raise UserError(f"{source}: no such checkpoint or run directory")
    return p


def weights(path: Path) -> dict:
    """The model's plain state dict of a checkpoint: sharded (verified, read whole here) or full."""
    if path.is_dir():
        from launch.parallel import dcp

        store.verify_here(path)
        return dcp.export(path)
    return store.load(path)["model"]


def run(args) -> int:
    path = resolve(args.source, args.step)
    state = weights(path)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    out = Path(args.output) if args.output else run_dir / f"model.{path.name.split('.')[0]}.pt"
    store.save_weights(out, state)
    print(f"wrote {out} ({len(state)} tensors, {sum(t.numel() for t in state.values()):,} values) from {path}")
    return 0
