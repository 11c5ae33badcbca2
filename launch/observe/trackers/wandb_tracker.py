"""Weights & Biases. Mode, entity, key and directory come from W&B's own variables (WANDB_MODE=offline
runs with no network, `wandb sync` uploads them later). Its files go under $WANDB_DIR/wandb/ when
WANDB_DIR is set, else under <run dir>/wandb/ (not the working directory, W&B's own default).

One history row per metrics.jsonl record, each with the optimizer step as `step`, the x axis of
every chart (define_metric). W&B's own row counter (`_step`) is kept in trackers.json and goes on
from there after a resume, so a continued run never writes a row number twice: offline, each
process writes its own offline-run-*-<id> directory, all of them the same run."""

from __future__ import annotations

import os
import secrets
import string
import time
from pathlib import Path
from typing import Optional

from launch.observe.trackers import require


class WandbTracker:
    durable_at_finish = True  # W&B writes its run file in 32 KiB blocks and completes it in finish()

    @classmethod
    def check(cls) -> None:
        require("wandb")

    def __init__(self, run_dir: Path, meta: dict):
        self.run_dir, self.meta = Path(run_dir), meta
        self.run = None
        self.row = 0
        self.where = ""

    def open(self, saved: dict) -> dict:
        import wandb  # here, in the relay: the training processes only check that it is installed

        ident = {
            "id": saved.get("id") or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8)),
            "project": saved.get("project") or self.meta["project"] or os.environ.get("WANDB_PROJECT") or "launch",
        }
        root = os.environ.get("WANDB_DIR") or str(self.run_dir)
        # A process's files are <root>/wandb/*run-<start second>-<id> (.wandb where that exists, as W&B
        # picks): a second process of the same run within the same second would write into the first one's.
        while any(Path(root).glob(f"*wandb/*run-{time.strftime('%Y%m%d_%H%M%S')}-{ident['id']}")):
            time.sleep(0.05)
        # console='off': W&B would otherwise wrap this process's stdout/stderr; silent: no banner.
        self.run = wandb.init(
            id=ident["id"], project=ident["project"], name=self.meta["name"], resume="allow", dir=root,
            settings=wandb.Settings(silent=True, console=os.environ.get("WANDB_CONSOLE", "off")),
        )
        self.run.config.update(self.meta["config"], allow_val_change=True)  # a setting changed on resume shows its new value
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        # Online, W&B knows where the run's history ends; offline it starts at 0 in every process.
        self.row = max(int(saved.get("row", -1)) + 1, int(getattr(self.run, "starting_step", 0) or 0))
        offline = self.run.settings.mode == "offline"
        seen = f"offline, in {self.run.settings.wandb_dir}; wandb sync uploads it" if offline else self.run.url
        self.where = f"run {ident['id']} in project {ident['project']} ({seen})"
        return {**ident, "row": self.row - 1}

    def log(self, step: int, numbers: dict) -> Optional[dict]:
        self.run.log({"step": step, **numbers}, step=self.row, commit=True)
        self.row += 1
        return {"row": self.row - 1}

    def finish(self, status: str, model: Optional[str]) -> None:
        if model:
            self.run.summary["model_path"] = model
        if status == "stopped":
            self.run.mark_preempting()  # stopped on purpose (preemption, STOP file): the rerun continues it
        self.run.finish(exit_code=0 if status == "finished" else 1)
