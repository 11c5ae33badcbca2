"""Every random number the launcher is responsible for, and where it comes from.

- Model initialisation: `train.seed`, the same on every rank (identical initial weights).
- In-model randomness during training (dropout, stochastic depth): one stream per rank, derived from
  `train.seed` and the rank, so the k micro-batches of a global batch draw independent masks. Every
  rank's stream is saved in the checkpoint and restored to that rank.
- Sample randomness (augmentation in a Dataset's __getitem__ or a stream's iterator): a pure function
  of (train.seed, epoch, sample index), whichever process loads the sample (launch.data.seeding).

Seeds are mixed with splitmix64, so neighbouring ranks, epochs and indices get unrelated streams.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def mix(*parts: int) -> int:
    """A 63-bit seed from integers (negative ones allowed); unrelated outputs for neighbouring inputs."""
    h = 0x6A09E667F3BCC908
    for p in parts:
        h = _splitmix64(h ^ (int(p) & MASK64))
    return h >> 1


def seed_cpu(seed: int) -> None:
    """Seed torch's CPU generator, Python's `random` and numpy's global generator (not CUDA: reseeding
    a device generator would cost a launch and is not where augmentation draws)."""
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)


def seed_rank(seed: int, rank: int) -> None:
    """This rank's training stream: CPU generators as seed_cpu, and the CUDA ones."""
    s = mix(seed, 0x52414E4B, rank)  # 'RANK'
    seed_cpu(s)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(s)


def state() -> dict:
    """This process's generator states, as tensors and plain types (weights_only-loadable)."""
    out = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out["numpy"] = {"keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}
    return out


def set_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in s and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])
    if "numpy" in s:
        n = s["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"]))


@contextlib.contextmanager
def preserved():
    """Run a block that reseeds the CPU generators, then put this process's streams back."""
    t, p, n = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(t)
        random.setstate(p)
        np.random.set_state(n)
