"""data.name=tokens: a memory-mapped token file as nanoGPT writes it (train.bin / val.bin: uint16 or
uint32 token ids back to back), cut into windows of data.seq_len for next-token prediction.

Window i starts at token i * data.stride (data.stride=0: seq_len, windows side by side; 1: every
offset, nanoGPT's random-offset sampling as a map-style dataset); its item is (tokens [seq_len],
targets [seq_len]), the targets the tokens shifted by one. data.val_path is the evaluation file;
without it the last data.val_fraction of data.path evaluates. Nothing is read into memory: each
process maps the file itself (a mapped array pickled to a DataLoader worker would be copied whole).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from launch.data.types import DataBundle, Split
from launch.errors import UserError


class TokenWindows(Dataset):
    needs_sample_seeds = False  # no randomness in loading a window: skip the per-sample seeding (launch.data.seeding)

    def __init__(self, path: str, dtype: str, seq_len: int, stride: int, first: int = 0, last: int = -1):
        self.path, self.dtype, self.seq_len, self.stride = path, dtype, seq_len, stride
        size = Path(path).stat().st_size // np.dtype(dtype).itemsize
        self.first, self.last = first, size if last < 0 else last
        span = self.last - self.first - 1  # the last window needs one more token for its targets
        self.n = 0 if span < seq_len else (span - seq_len) // stride + 1
        self._tokens = None

    def __getstate__(self):  # map anew in each process
        return {**self.__dict__, "_tokens": None}

    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        return self._tokens

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        start = self.first + int(i) * self.stride
        chunk = torch.from_numpy(self.tokens()[start : start + self.seq_len + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


def build(cfg) -> DataBundle:
    d = cfg.data
    stride = d.stride or d.seq_len
    for path in filter(None, (d.path, d.val_path)):
        p = Path(path)
        if not p.is_file():
            raise UserError(f"data.name=tokens: token file not found: {path}")
        if p.stat().st_size % np.dtype(d.token_dtype).itemsize:
            raise UserError(f"{path}: {p.stat().st_size} bytes is not a whole number of {d.token_dtype} tokens (data.token_dtype)")
    if d.val_path:
        train = TokenWindows(d.path, d.token_dtype, d.seq_len, stride)
        ev = TokenWindows(d.val_path, d.token_dtype, d.seq_len, d.seq_len)
    else:
        size = Path(d.path).stat().st_size // np.dtype(d.token_dtype).itemsize
        cut = int(size * (1 - d.val_fraction))
        train = TokenWindows(d.path, d.token_dtype, d.seq_len, stride, 0, cut)
        ev = TokenWindows(d.path, d.token_dtype, d.seq_len, d.seq_len, cut)
    for name, split in (("training", train), ("evaluation", ev)):
        if len(split) == 0:
            raise UserError(f"data.name=tokens: the {name} tokens hold no window of data.seq_len={d.seq_len} (+1 for the targets)")
    return DataBundle(Split(dataset=train), Split(dataset=ev), d.seq_len, None, {"kind": "tokens", "seq_len": d.seq_len})
