"""A token stream: an IterableDataset with no length, read front to back (configs/token_stream.yaml).

Training reads the token file endlessly (train.max_steps ends the run); evaluation makes one pass
over the evaluation file. Item: (tokens [seq_len], targets [seq_len]). The stream keeps its own
position and offers `state_dict()` / `load_state_dict()`, so a rerun continues from the checkpoint's
position without reading the stream again from its start (a stream without them is replayed and
skipped instead: same result, more reading). Every rank reads the whole stream and keeps its share
(launch.data.stream), so DDP trains on the same global batches as one process.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import IterableDataset


class TokenStream(IterableDataset):
    needs_sample_seeds = False  # reading windows draws no random numbers: no per-item seeding needed

    def __init__(self, split: str, path: str, val_path: str, seq_len: int = 32, dtype: str = "uint16"):
        self.path = path if split == "train" else val_path
        self.endless = split == "train"
        self.seq_len, self.dtype = seq_len, dtype
        self.position = 0  # windows handed out in the current pass (what state_dict reports)
        self._resume_at = None

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self._resume_at = int(state["position"])

    def __iter__(self):
        tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        windows = (len(tokens) - 1) // self.seq_len
        self.position, self._resume_at = self._resume_at or 0, None
        while self.endless or self.position < windows:
            start = (self.position % windows) * self.seq_len
            chunk = torch.from_numpy(tokens[start : start + self.seq_len + 1].astype(np.int64))
            self.position += 1
            yield chunk[:-1], chunk[1:]
