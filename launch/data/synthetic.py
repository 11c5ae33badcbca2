"""The seeds' datasets, generated in code: the 5+2-point toy problem and the benchmark's random data."""

from __future__ import annotations

import math

import torch

from launch.data.types import DataBundle, Split


def toy() -> DataBundle:
    """The seeds' toy problem: 5 training and 2 test points in 2-D, two classes (x0 + x1 > 1)."""
    x_train = torch.tensor([[0.0, 0.0], [0.2, 0.9], [1.0, 1.0], [0.9, 0.4], [0.1, 0.3]])
    y_train = torch.tensor([0, 1, 1, 1, 0])
    x_test = torch.tensor([[0.8, 0.9], [0.2, 0.1]])
    y_test = torch.tensor([1, 0])
    return DataBundle(Split(x_train, y_train), Split(x_test, y_test), 2, 2)


def synthetic(d) -> DataBundle:
    """The seeds' benchmark data: standard-normal features; labels from a fixed random teacher
    MLP (learnable) or uniformly random (as in the seeds' speed benchmark). Identical on every rank."""
    g = torch.Generator().manual_seed(d.seed)
    n = d.n_train + d.n_eval
    x = torch.randn(n, d.features, generator=g)
    if d.learnable:
        w1 = torch.randn(d.features, 64, generator=g) / math.sqrt(d.features)
        w2 = torch.randn(64, d.classes, generator=g) / 8.0
        y = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
    else:
        y = torch.randint(0, d.classes, (n,), generator=g)
    return DataBundle(Split(x[: d.n_train], y[: d.n_train]), Split(x[d.n_train :], y[d.n_train :]), d.features, d.classes)


def build_toy(cfg) -> DataBundle:
    return toy()


def build(cfg) -> DataBundle:
    return synthetic(cfg.data)
