"""One split of a corpus as a Dataset: its logical units, their samples, and the feeder that orders them.

`Units` decodes a logical unit into sample arrays (rows -> features and targets, documents -> token
windows) through an LRU bounded in bytes. `CorpusSplit` is a map-style Dataset (random access works,
one unit decoded per item), but the loop never uses it so: `make_feeder` gives it its own feeder
(launch.data.corpus.feeder), which deals its order (launch.data.corpus.order) to the ranks.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from launch.data.corpus.read import LRU


class Units:
    """Logical units of a corpus as sample arrays (numpy), cached."""

    def __init__(self, corpus, reader, maker, cache_bytes: int):
        self.corpus, self.reader, self.maker = corpus, reader, maker
        self.cache = LRU(cache_bytes)

    def where(self, c: int) -> str:
        lo, hi = self.corpus.unit_range(c)
        p = self.corpus.pieces(lo, hi)[0][0]
        info = self.corpus.files[int(self.corpus.phys["file"][p])]
        return f"{info.path} (unit {c} of {self.corpus.what}, corpus rows {lo}-{hi - 1})"

    def get(self, c: int) -> dict:
        hit = self.cache.get(c)
        if hit is not None:
            return hit[0]
        arrays = self.maker.make(self.reader.rows(*self.corpus.unit_range(c)), self.where(c))
        return self.cache.put(c, arrays, sum(a.nbytes for a in arrays.values()))

    def take(self, pieces: list) -> dict:
        """The samples of [(unit, first, end), ...] laid end to end, copied in unit by unit (a unit
        is dropped once copied, unless the cache keeps it: a block's run is held once, not twice)."""
        out, at, total = None, 0, sum(hi - lo for _, lo, hi in pieces)
        for c, lo, hi in pieces:
            arrays = self.get(c)
            if out is None:
                out = {k: np.empty((total, *v.shape[1:]), dtype=v.dtype) for k, v in arrays.items()}
            for k, v in arrays.items():
                out[k][at : at + hi - lo] = v[lo:hi]
            at += hi - lo
        return out


class CorpusSplit(Dataset):
    """The samples of some logical units of a corpus (all, or the training or held-out ones)."""

    needs_sample_seeds = False  # loading draws no random numbers

    def __init__(self, source: Units, units: np.ndarray, samples: np.ndarray, name: str):
        self.source, self.units, self.samples, self.name = source, np.asarray(units, dtype=np.int64), np.asarray(samples, dtype=np.int64), name
        self.prefix = np.concatenate([[0], np.cumsum(self.samples)]).astype(np.int64)
        self.record: dict = {}  # what checkpoints keep of the corpus (set by the build)
        self.window = 0  # data.shuffle_window (0: auto)

    def __len__(self) -> int:
        return int(self.prefix[-1])

    def canonical_positions(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """Split positions [lo, hi) in unit order as (split unit index, first, end)."""
        out = []
        j = int(np.searchsorted(self.prefix, lo, side="right")) - 1
        while lo < hi:
            end = min(hi, int(self.prefix[j + 1]))
            if end > lo:
                out.append((j, lo - int(self.prefix[j]), end - int(self.prefix[j])))
            lo, j = end, j + 1
        return out

    def arrays(self, pieces: list) -> dict:
        """Samples of [(split unit index, first, end), ...] (as EpochOrder.pieces gives them)."""
        return self.source.take([(int(self.units[u]), lo, hi) for u, lo, hi in pieces])

    def batch(self, arrays: dict, idx) -> tuple:
        return self.source.maker.batch({k: torch.as_tensor(v) for k, v in arrays.items()}, torch.as_tensor(idx))

    def __getitem__(self, i: int):
        inputs, target = self.batch(self.arrays(self.canonical_positions(int(i), int(i) + 1)), [0])
        return inputs[0], target[0]

    def make_feeder(self, cfg, device, rank: int, world_size: int, batch_size: int):
        from launch.data.corpus.feeder import CorpusFeeder

        return CorpusFeeder(self, cfg, device, rank, world_size, batch_size)
