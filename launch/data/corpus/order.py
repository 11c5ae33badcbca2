"""A corpus's epoch order: one sequence of micro-batches that every world size deals out alike, in
which a rank's share of each micro-batch comes from a bounded, contiguous run of units.

Let M = world_size x batch_size be the micro-batch of all ranks together (one process at batch M
has the same M). For epoch e:

1. The split's logical units are permuted (seeded by train.seed and e), and their samples, each
   unit's in file order, are laid end to end: the sequence Q (N samples).
2. Q is cut into blocks of sigma x M samples (sigma = data.shuffle_window // M rounds; the last block
   may be shorter). A block is cut into M strata of sigma consecutive samples.
3. Micro-batch t of a block takes one sample from every stratum: stratum j gives its pi_j(t)-th
   sample, pi_j a permutation seeded by (seed, e, block, j). A short last block has floor(n/M) rounds
   of this kind and then one remainder micro-batch of the leftover samples: the epoch's last,
   the only one with fewer than M samples.
4. Rank r of k takes strata [r*b, (r+1)*b) of every round (b = M/k): that is the contiguous run
   Q[base + r*b*sigma, base + (r+1)*b*sigma) of the block. In the remainder micro-batch rank r takes
   the r-th contiguous piece (ranks differ by one at most; a rank with none runs a zero-weight
   stand-in, as for every other dataset).

Steps 1-3 depend on (seed, epoch, the units' sample counts, M, data.shuffle_window) and nothing else:
the micro-batches are the same for any world size and any data.num_workers at the same M, so DDP
equals one process and a run resumed at another world size (same global batch) continues it. Step 4
makes a rank read only its 1/k of each block: the units overlapping its run, plus at most one unit at
each end shared with a neighbour.

Shuffle quality: units land anywhere in the epoch; a sample moves at most one block from its unit's
place; a micro-batch holds one sample from each of M evenly spaced strata of its block, so it mixes
every unit of the block; consecutive micro-batches of a block draw on the same units.
"""

from __future__ import annotations

import numpy as np

MASK = (1 << 63) - 1


def _rng(*parts) -> np.random.Generator:
    return np.random.default_rng([int(p) & MASK for p in parts])


def remainder_share(rem: int, rank: int, k: int) -> tuple[int, int]:
    """(offset, size) of rank's contiguous piece of a remainder micro-batch of `rem` samples."""
    base, extra = divmod(rem, k)
    return rank * base + min(rank, extra), base + (rank < extra)


class EpochOrder:
    """The order of one epoch over a split whose units hold `unit_samples` samples (split order)."""

    def __init__(self, unit_samples: np.ndarray, seed: int, epoch: int, micro: int, window: int):
        self.seed, self.epoch, self.M = seed, epoch, micro
        self.perm = _rng(seed, epoch, 0x5EED).permutation(len(unit_samples))
        self.start = np.concatenate([[0], np.cumsum(np.asarray(unit_samples, dtype=np.int64)[self.perm])]).astype(np.int64)
        self.n = int(self.start[-1])
        self.sigma = max(1, window // micro)

    @property
    def micro_steps(self) -> int:
        return -(-self.n // self.M)

    def layout(self, block: int) -> tuple[int, int, int]:
        """(first position, stratified rounds, remainder samples) of a block."""
        base = block * self.sigma * self.M
        size = min(self.sigma * self.M, self.n - base)
        rounds = self.sigma if size == self.sigma * self.M else size // self.M
        return base, rounds, size - rounds * self.M

    def micro_sizes(self, first: int) -> list[int]:
        """Samples of each micro-batch from `first` on (all M but possibly the last)."""
        return [min(self.M, self.n - i * self.M) for i in range(first, self.micro_steps)]

    def plan(self, block: int, rank: int, k: int, first_round: int = 0) -> tuple[list, list]:
        """This rank's part of a block: (Q ranges to read, [(indices into their concatenation, real samples)]
        for each micro-batch from `first_round` on)."""
        base, rounds, rem = self.layout(block)
        b = self.M // k
        ranges, micro = [], []
        if rounds:
            lo = base + rank * b * rounds
            ranges.append((lo, lo + b * rounds))
            if first_round < rounds:
                draws = _rng(self.seed, self.epoch, block, 0xB10C).random((self.M, rounds))[rank * b : (rank + 1) * b]
                at = np.arange(b, dtype=np.int64)[:, None] * rounds + draws.argsort(axis=1, kind="stable")
                micro += [(at[:, t].copy(), b) for t in range(first_round, rounds)]
        if rem and first_round <= rounds:
            off, size = remainder_share(rem, rank, k)
            first = base + rounds * self.M
            lo, n = (first + off, size) if size else (first, 1)  # nothing left for this rank: a stand-in
            held = sum(hi - lo_ for lo_, hi in ranges)
            ranges.append((lo, lo + n))
            micro.append((np.arange(held, held + n, dtype=np.int64), size))
        return ranges, micro

    def pieces(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """Q positions [lo, hi) as (split unit index, first sample in it, end sample in it)."""
        out = []
        u = int(np.searchsorted(self.start, lo, side="right")) - 1
        while lo < hi:
            end = min(hi, int(self.start[u + 1]))
            if end > lo:
                out.append((int(self.perm[u]), lo - int(self.start[u]), end - int(self.start[u])))
            lo, u = end, u + 1
        return out


def auto_window(unit_samples: np.ndarray, sample_bytes: int, micro: int, units: int = 64, most_bytes: int = 256 << 20) -> int:
    """data.shuffle_window=0: blocks of about `units` average units (so a rank's run of a block spans
    many units and the unit it shares with a neighbour costs little), at most `most_bytes` of samples
    and at least one micro-batch; a function of the corpus and M only."""
    mean = float(np.mean(unit_samples)) if len(unit_samples) else 1.0
    want = min(units * mean, most_bytes / max(1, sample_bytes))
    return max(micro, int(want // micro) * micro)


def shuffle_stats(order: EpochOrder, micro_batches: int = 64) -> dict:
    """How well an epoch mixes: units per micro-batch, and the units two consecutive micro-batches share."""
    per, shared = [], []
    prev = None
    for i in range(min(micro_batches, order.micro_steps)):
        block, t = divmod(i, order.sigma)
        ranges, micro = order.plan(block, 0, 1, t)
        flat = np.concatenate([np.arange(lo, hi) for lo, hi in ranges])
        units = set(order.perm[np.searchsorted(order.start, flat[micro[0][0]], side="right") - 1].tolist())
        per.append(len(units))
        if prev is not None:
            shared.append(len(units & prev) / max(1, len(units | prev)))
        prev = units
    return {"units_per_micro_batch": float(np.mean(per)), "consecutive_jaccard": float(np.mean(shared)) if shared else 0.0}
