"""Rank-0 output: one line per epoch, metrics.jsonl, an optional progress bar. No collectives here."""

from __future__ import annotations

import json
import sys
from pathlib import Path


class MetricsLog:
    """Appends one JSON object per record to <run dir>/metrics.jsonl (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled

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
        f"eval_loss {rec['eval_loss']:.4f} | eval_acc {rec['eval_accuracy']:.4f} | "
        f"{rec['samples_per_s']:.0f} samples/s | {rec['elapsed_s']:.1f}s"
    )
