"""Stand-ins of the same shape as models and pipelines users bring (loaded by import path in tests):
a Hugging Face-shaped causal LM (a ModelOutput-like mapping, labels shifted inside, a config object),
a model whose loss method returns a mean, a dropout probe, a model with an unused parameter, numpy
items, variable-length items with a padding collate, and a stream without state."""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from tests.user_code import SeqGRU, Tokens


class FakeModelOutput(OrderedDict):
    """What transformers' ModelOutput is: an ordered mapping whose keys are also attributes."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


class LMConfig:
    """A config object, as Hugging Face and nanoGPT constructors take one."""

    def __init__(self, vocab: int = 12, width: int = 16):
        self.vocab, self.width = vocab, width


class MappingLM(nn.Module):
    """Hugging Face-shaped: MappingLM(config); forward(input_ids, labels=None) -> mapping with 'logits'
    and, given labels, 'loss': a mean cross-entropy over the labels shifted by one (-100 ignored), as
    transformers' causal LMs compute it."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.net = SeqGRU(config.vocab, config.width)

    def forward(self, input_ids, labels=None):
        logits = self.net(input_ids)
        out = FakeModelOutput(logits=logits)
        if labels is not None:
            out["loss"] = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        return out


class HFLabels(Tokens):
    """Items (input_ids, labels) in Hugging Face's convention: labels are the inputs themselves (the
    model shifts them), right-padded with -100 to a real length that varies per sequence (10, 8, 6,
    4, 2), so token counts differ between samples and ranks, and shifting changes each count by one."""

    def __init__(self, split: str, n: int = 101, length: int = 10):
        super().__init__(split, n, length)
        self.y = self.x.clone()
        real = length - 2 * (torch.arange(len(self.x)) % 5)
        self.y[torch.arange(length)[None, :] >= real[:, None]] = -100


class MeanLoss(nn.Module):
    """The natural wrapper around a model's own loss that gets the contract wrong: a mean, not a sum."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 1)

    def forward(self, x):
        return self.lin(x)

    def loss(self, batch):
        x, y = batch
        return ((self(x) - y) ** 2).mean(), x.shape[0]


class DropoutProbe(nn.Module):
    """Records the dropout mask of its first training forward in $PROBE_DIR/rank<RANK>.pt."""

    def __init__(self, features: int = 16, classes: int = 2):
        super().__init__()
        self.a, self.b = nn.Linear(features, 64), nn.Linear(64, classes)
        self.drop = nn.Dropout(0.5)
        self.recorded = False

    def forward(self, x):
        y = torch.relu(self.a(x))
        if self.training:
            mask = self.drop(torch.ones_like(y))  # dropout drawn from this rank's generator
            if not self.recorded and os.environ.get("PROBE_DIR"):
                torch.save(mask != 0, os.path.join(os.environ["PROBE_DIR"], f"rank{os.environ.get('RANK', '0')}.pt"))
                self.recorded = True
            y = y * mask
        return self.b(y)


class Unused(nn.Module):
    """A model with a parameter its forward never uses (a common DDP first-hour error)."""

    def __init__(self, features: int = 16, classes: int = 2):
        super().__init__()
        self.used, self.spare = nn.Linear(features, classes), nn.Linear(features, classes)

    def forward(self, x):
        return self.used(x)


class NumpyBlobs(Dataset):
    """Items as numpy arrays and numpy integers (default_collate turns them into tensors)."""

    num_classes = 3

    def __init__(self, split: str, n: int = 90):
        rng = np.random.default_rng(0 if split == "train" else 1)
        self.y = rng.integers(0, 3, n)
        self.x = (rng.normal(size=(n, 6)) * 0.5 + self.y[:, None]).astype(np.float32)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class VarLen(Dataset):
    """Sequences of different lengths (3..10) of the counting language: next token = (token + step) % 12."""

    def __init__(self, split: str, n: int = 101):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        self.items = []
        for _ in range(n):
            length = int(torch.randint(3, 11, (), generator=g))
            start, step = int(torch.randint(0, 12, (), generator=g)), int(torch.randint(1, 4, (), generator=g))
            seq = (start + step * torch.arange(length + 1)) % 12
            self.items.append((seq[:-1], seq[1:]))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def pad(items):
    """data.collate: pad inputs with 0 and targets with -100 (ignored, so not counted) to the longest."""
    length = max(len(x) for x, _ in items)
    x = torch.zeros(len(items), length, dtype=torch.long)
    y = torch.full((len(items), length), -100, dtype=torch.long)
    for i, (a, b) in enumerate(items):
        x[i, : len(a)], y[i, : len(b)] = a, b
    return x, y


class CountingStream(IterableDataset):
    """A finite stream without state_dict (resumed by replay): the counting language, 77 sequences."""

    def __init__(self, split: str, n: int = 77):
        self.data = Tokens(split, n=n)

    def __iter__(self):
        for i in range(len(self.data)):
            yield self.data[i]


# ---------------------------------------------------------------- LightningModules (issue 22 #7)
# `lightning` is the real package where installed, else tests/fixtures/lightning_standin on PYTHONPATH.
try:
    from lightning.pytorch import LightningModule as _LitBase
except ImportError:  # neither on the path: this module was imported for its other models
    _LitBase = nn.Module


class LitClassifier(_LitBase):
    """A LightningModule as users write one: training_step returns the batch's mean loss (label-smoothed,
    so it is not train.loss's plain cross-entropy) and logs it; configure_optimizers asks for Adam at
    lr=0.5 (not used: the launcher's optimizer trains it)."""

    def __init__(self, in_features: int = 16, num_classes: int = 2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, 32), nn.ReLU(), nn.Linear(32, num_classes))
        self.loss = nn.CrossEntropyLoss(label_smoothing=0.2)  # a loss module named `loss`: not a loss(batch) method

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss(self(x), y)
        self.log("train_loss", loss)
        return {"loss": loss}

    def configure_optimizers(self):
        import torch

        return torch.optim.Adam(self.parameters(), lr=0.5)


class LitSumLoss(LitClassifier):
    """training_step returning a sum over the batch, where Lightning means a mean: refused on the first batch."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y, reduction="sum")


class LossModule(nn.Module):
    """A model holding its criterion as `self.loss` (a module): trained with train.loss through forward."""

    def __init__(self, in_features: int = 16, num_classes: int = 2):
        super().__init__()
        self.lin = nn.Linear(in_features, num_classes)
        self.loss = nn.CrossEntropyLoss()

    def forward(self, x):
        return self.lin(x)


class LitForwardOnly(_LitBase):
    """A LightningModule without a training_step: it trains through forward with train.loss, and says so."""

    def __init__(self, in_features: int = 16, num_classes: int = 2):
        super().__init__()
        self.lin = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.lin(x)
