"""A tracker of our own for tests/test_trackers.py (log.tracker=tests.user_trackers:Recorder): it appends
what it is given to <run dir>/recorder.jsonl, and with RECORDER_FAIL_AT=N fails from step N on, as a
tracker on a full disk would; RECORDER_ID=X makes `open` name run X whatever was saved."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path


class Recorder:
    def __init__(self, run_dir, meta):
        self.path = Path(run_dir) / "recorder.jsonl"
        self.meta = meta
        self.where = f"recording into {self.path}"

    def _add(self, **what):
        with open(self.path, "a") as f:
            f.write(json.dumps(what) + "\n")

    def open(self, saved):
        self._add(open=saved.get("id"), lr=self.meta["config"]["train"]["lr"])
        return {"id": os.environ.get("RECORDER_ID") or saved.get("id") or "rec-1"}  # RECORDER_ID: as a store that lost the saved run

    def log(self, step, numbers):
        fail_at = int(os.environ.get("RECORDER_FAIL_AT", 0) or 0)
        if fail_at and step >= fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._add(step=step, numbers=numbers)

    def finish(self, status, model):
        self._add(finish=status, model=model)
