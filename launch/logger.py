"""Rank-0 output: one line per epoch, metrics.jsonl, an optional progress bar. No collectives here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from launch.errors import UserError


# TensorBoard tags for record fields; other numeric fields go under "other/".
TB_TAGS = {
    "train_loss": "loss/train", "eval_loss": "loss/eval", "train_loss_step": "loss/train_step",
    "eval_accuracy": "accuracy/eval", "lr": "lr", "samples_per_s": "throughput/samples_per_s",
    "grad_norm": "grad_norm", "rss_mb": "resources/rss_mb", "cpu_percent": "resources/cpu_percent",
}
TB_SKIP = ("epoch", "step", "world_size", "eval_samples", "elapsed_s")


def tensorboard_writer_class():
    """SummaryWriter, imported lazily; a one-line hint when the optional extra is missing.
    Every rank calls this during setup so a missing package stops all of them alike."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("log.tensorboard=true needs the tensorboard package: pip install tensorboard (or the [tensorboard] extra), or set log.tensorboard=false") from None
    return SummaryWriter


class MetricsLog:
    """Appends one JSON object per record to <run dir>/metrics.jsonl (rank 0 only), and mirrors
    its numbers as TensorBoard scalars under <run dir>/tb when asked (x axis: optimizer step)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = False, purge_step: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard:
            # purge_step drops events a resumed run will redo (as truncate_after does for metrics.jsonl).
            self.tb = tensorboard_writer_class()(log_dir=str(Path(run_dir) / "tb"), purge_step=purge_step)

    def truncate_after(self, step: int) -> None:
        """On resume, drop records written after the checkpoint we resume from (they will be redone)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key not in TB_SKIP and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(TB_TAGS.get(key, f"other/{key}"), value, record["step"])
            for i, mb in enumerate(record.get("cuda_peak_mb", [])):
                self.tb.add_scalar(f"resources/cuda_peak_mb/rank{i}", mb, record["step"])
            self.tb.flush()  # records are rare (epochs, log.every_steps): keep the files current

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
        + f"{rec['samples_per_s']:.0f} samples/s | {rec['elapsed_s']:.1f}s"
        + (f" | rss {rec['rss_mb']:.0f} MB | cpu {rec['cpu_percent']:.0f}%" if "rss_mb" in rec else "")
        + (f" | cuda peak {max(rec['cuda_peak_mb']):.0f} MB" if rec.get("cuda_peak_mb") else "")
    )
