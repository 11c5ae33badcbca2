"""Experiment trackers (`log.tracker`): W&B, MLflow or a class of your own, fed by rank 0.

TensorBoard is written in the training process (launch.observe.logger). The others run in a relay process
(launch.observe.trackers.relay) that rank 0 starts and feeds through a pipe (launch.observe.trackers.pipe), because
every exit but a finish leaves through os._exit (launch.processes.dist.exit_hard: no interpreter teardown that
could hang on a half-dead process group) and W&B writes its run file in 32 KiB blocks that only
`finish()` completes: a W&B run left by os._exit after two records kept none of them. When rank 0
leaves by any path the pipe ends, and the relay finishes every tracker run (finished, stopped or
failed), so a stop, a crash or a kill of rank 0 loses nothing; and a slow tracker never stalls a step.
Should the relay be killed with the job (the end of a SLURM step kills what is left in it), a resume
has it read metrics.jsonl again and give each tracker what it lacks after its last kept step (W&B's is
kept only at its finish), so what was not safe yet is logged again; a tracker whose run is gone from
its store (`open` returns another id) gets all of it.

A tracker is a class (the built-ins below, or `log.tracker=pkg.module:Class`):

    tracker = Class(run_dir: Path, meta: dict)   # meta: name (run.name), project (log.project), config (nested dict),
                                                 # step (where this job starts: 0, or the step it resumes from)
    ident = tracker.open(saved: dict)            # start, or continue the run `saved` names ({} the first time);
                                                 # returns what names it (kept in <run dir>/trackers.json): another
                                                 # "id" than saved's says its run is new, to be caught up from the start
    tracker.log(step: int, numbers: dict)        # {name: float}; x axis: the optimizer step; may return a dict to keep
    tracker.finish(status: str, model)           # 'finished' (model: model.pt's path), 'stopped' or 'failed' (model None)
    tracker.where                                # optional: one line said when the run opens
    Class.check()                                # optional classmethod: raise ImportError for a missing piece
    Class.durable_at_finish = True               # optional: what it was given is safe only once finish() returned

The relay keeps, per tracker, the last step it logged and the fields logged at that step, so records
recomputed after a resume are never logged twice and no tracker ever sees a step go backwards.
"""

from __future__ import annotations

import importlib
import importlib.util

from launch.errors import UserError

TRACKERS = {"wandb": "launch.observe.trackers.wandb_tracker:WandbTracker", "mlflow": "launch.observe.trackers.mlflow_tracker:MlflowTracker"}
HINTS = {
    "wandb": "pip install wandb (or the [wandb] extra)",
    "mlflow": "pip install mlflow-skinny sqlalchemy alembic (or the [mlflow] extra; sqlalchemy and alembic carry MLflow's sqlite store)",
}
STATE = "trackers.json"  # in the run directory: per tracker, what names its run and the last step logged to it
STOPPED = "STOPPED"  # launch.processes.stopping.STOPPED, the mark of a stop on purpose (not imported: that would load torch into the relay)


def load(name: str):
    """The tracker class for a log.tracker entry (importing its package)."""
    module, _, attr = TRACKERS.get(name, name).partition(":")
    return getattr(importlib.import_module(module), attr)


def check(names: list[str]) -> None:
    """On every rank before anything is written: each tracker asked for is there, or one line naming
    what is missing and how to get it (so every rank stops alike, exit 2). The built-ins only look for
    their packages (milliseconds; importing wandb and mlflow would cost every rank 2 s): only the relay
    imports them, and a broken install is that tracker's failure, one warning line."""
    for name in names:
        try:
            cls = load(name)
            if hasattr(cls, "check"):
                cls.check()
        except ImportError as e:
            hint = HINTS.get(name, "check the import path and that its package is installed")
            raise UserError(f"log.tracker: {name} cannot be used here ({_short(e)}): {hint}, or remove it from log.tracker") from None
        except AttributeError as e:
            raise UserError(f"log.tracker: {name}: {_short(e)}") from None


def require(*packages: str) -> None:
    """ImportError naming the first of `packages` that is not installed (found, not imported)."""
    for package in packages:
        try:
            found = importlib.util.find_spec(package) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ImportError(f"No module named '{package}'")


def numbers(record: dict) -> tuple[int, dict]:
    """(step, the record's numbers by name): the step is the x axis, a list (cuda_peak_mb, one entry
    per rank) becomes name/rank0, name/rank1, ...; booleans and text are left out."""
    out = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, (list, tuple)):
            out.update({f"{key}/rank{i}": v for i, v in enumerate(value) if _number(v)})
        elif _number(value):
            out[key] = value
    return int(record["step"]), out


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _short(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
