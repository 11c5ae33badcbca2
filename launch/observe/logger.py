"""Rank-0 output: one line per epoch, metrics.jsonl, an optional progress bar. No collectives here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

from launch.checkpoint import integrity
from launch.errors import UserError
from launch.observe import trackers
from launch.observe.trackers.pipe import Relay

# TensorBoard tags for record fields; other numeric fields go under "other/".
TB_TAGS = {
    "train_loss": "loss/train", "eval_loss": "loss/eval", "train_loss_step": "loss/train_step",
    "eval_accuracy": "accuracy/eval", "lr": "lr", "samples_per_s": "throughput/samples_per_s",
    "grad_norm": "grad_norm", "rss_mb": "resources/rss_mb", "cpu_percent": "resources/cpu_percent",
}
TB_SKIP = ("epoch", "step", "world_size", "eval_samples", "elapsed_s")


def tensorboard_writer_class():
    """SummaryWriter, imported lazily; a one-line hint when the optional extra is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("log.tracker=[tensorboard] (or log.tensorboard=true) needs the tensorboard package: pip install tensorboard (or the [tensorboard] extra), or leave it out") from None
    return SummaryWriter


def check_trackers(names: list[str]) -> None:
    """Every rank calls this during setup, before anything is written, so a tracker that cannot be
    imported stops all of them alike with one line (exit 2)."""
    if "tensorboard" in names:
        tensorboard_writer_class()
    trackers.check([n for n in names if n != "tensorboard"])


class MetricsLog:
    """Appends one JSON object per record to <run dir>/metrics.jsonl (rank 0 only), mirrors its
    numbers as TensorBoard scalars under <run dir>/tb, and hands each record to the other trackers'
    relay (launch.observe.trackers); x axis: the optimizer step."""

    def __init__(self, run_dir: Path, enabled: bool, names=(), purge_step: int = 0, meta: Optional[dict] = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.guard = None  # rank 0: False once the run directory was replaced (launch.checkpoint.rundir.RunLock.still_ours)
        self.tb = self.relay = None
        if enabled and "tensorboard" in names:
            # purge_step drops events a resumed run will redo (as truncate_after does for metrics.jsonl).
            self.tb = tensorboard_writer_class()(log_dir=str(Path(run_dir) / "tb"), purge_step=purge_step)
        others = [n for n in names if n != "tensorboard"]
        if enabled and others:
            meta = meta or {"name": Path(run_dir).name, "project": "", "config": {}}
            # step: where this job starts (a resume's checkpoint step; purge_step is the step after it)
            self.relay = Relay(run_dir, others, {**meta, "step": max(purge_step - 1, 0)})

    def truncate_after(self, step: int) -> Optional[str]:
        """On resume, drop records written after the checkpoint we resume from (they will be redone).
        Lines that are not a JSON record (the torn end of an append cut short by a kill or a full
        disk) are kept in a side file, never dropped; the returned line says where."""
        if not self.enabled or not self.path.exists():
            return None
        raw = self.path.read_bytes()
        good, bad = _parse(raw)
        note = None
        if bad:
            side = integrity.aside_name(self.path, "torn")
            integrity.atomic_write(side, lambda f: f.write(b"".join(line + b"\n" for line in bad)), what="torn lines of")
            note = (f"{self.path}: {len(bad)} torn line(s) (a write cut short by a kill or a full disk) kept in {side.name}; "
                    f"continuing with its {len(good)} complete record(s)")
        kept = [(line, rec) for line, rec in good if rec.get("step", 0) <= step]
        keep = b"".join(line + b"\n" for line, _ in kept)
        if keep != raw:
            integrity.atomic_write(self.path, lambda f: f.write(keep), what="metrics log")
        if self.relay is not None and step >= 0:  # what a tracker missed (it failed, was added, lost its run) comes from here
            self.relay.catch_up(step)
        return note

    def write(self, record: dict) -> None:
        if self.guard is not None and not self.guard():
            return  # the run directory was replaced: the next agreement stops the job
        if self.enabled:
            _append(self.path, (json.dumps(record) + "\n").encode())
        if self.tb is not None:
            for key, value in record.items():
                if key not in TB_SKIP and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(TB_TAGS.get(key, f"other/{key}"), value, record["step"])
            for i, mb in enumerate(record.get("cuda_peak_mb", [])):
                self.tb.add_scalar(f"resources/cuda_peak_mb/rank{i}", mb, record["step"])
            self.tb.flush()  # records are rare (epochs, log.every_steps): keep the files current
        if self.relay is not None:
            self.relay.send({"record": record})

    def close(self, model: Optional[Path] = None) -> None:
        """The run finished (`model`: model.pt, its final weights): wait for the trackers' finish, so
        the job ends with their runs complete. Any other end (None: a stop, an error; called when the
        run directory is let go, launch.checkpoint.rundir.RunLock) only ends the relay's input and leaves at once:
        the other ranks are leaving too, and a launcher that sees them go takes down a rank that lingers.
        The relay finishes the runs by itself; should it be killed with the job, the rerun logs again
        whatever had not been finished (launch.observe.trackers.relay)."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.relay is None:
            return
        if self.guard is not None and not self.guard():
            self.relay.abandon()  # the run directory is another job's now: nothing more goes into it
        else:
            self.relay.close(str(Path(model).resolve()) if model is not None else None, wait=model is not None)
        self.relay = None


def _append(path: Path, line: bytes) -> None:
    """One record, appended whole or not at all: a failed write (full disk, file size limit) is cut
    back off, so the next record never continues a torn line. One line naming the file and cause."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise integrity.WriteError(f"cannot append to {path}: {integrity.cause(e)}") from None
    try:
        end = os.fstat(fd).st_size
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view):]
    except OSError as e:
        try:
            os.ftruncate(fd, end)
        except OSError:
            pass
        raise integrity.WriteError(f"cannot append to {path}: {integrity.cause(e)}") from None
    finally:
        os.close(fd)


def _parse(raw: bytes) -> tuple[list[tuple[bytes, dict]], list[bytes]]:
    """(the lines that are JSON records, with them; the lines that are not)."""
    good, bad = [], []
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
            rec = None
        if isinstance(rec, dict):
            good.append((line, rec))
        else:
            bad.append(line)
    return good, bad


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of metrics.jsonl; a torn line (see MetricsLog.truncate_after) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [rec for _, rec in _parse(path.read_bytes())[0]]


def progress_bar(total: int, desc: str, setting: str, enabled: bool):
    """tqdm on rank 0 when wanted; otherwise None (the loop then does no per-step bar work)."""
    show = enabled and (setting == "true" or (setting == "auto" and sys.stderr.isatty()))
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def epoch_line(rec: dict) -> str:
    return (
        f"epoch {rec['epoch']:>3} | step {rec['step']:>6} | train_loss {rec['train_loss']:.4f} | "
        f"eval_loss {rec['eval_loss']:.4f} | "
        + (f"eval_acc {rec['eval_accuracy']:.4f} | " if "eval_accuracy" in rec else "")
        + "".join(f"{k} {v:.4f} | " for k, v in rec.items() if k.startswith("eval_") and isinstance(v, float) and k not in ("eval_loss", "eval_accuracy", "eval_samples"))
        + f"{rec['samples_per_s']:.0f} samples/s | {rec['elapsed_s']:.1f}s"
        + (f" | rss {rec['rss_mb']:.0f} MB | cpu {rec['cpu_percent']:.0f}%" if "rss_mb" in rec else "")
        + (f" | cuda peak {max(rec['cuda_peak_mb']):.0f} MB" if rec.get("cuda_peak_mb") else "")
    )
