"""A user's own model and dataset, loaded by import path (model.name / data.name = 'tests.user_code:...')."""

import torch
from torch import nn
from torch.utils.data import Dataset


class TinyNet(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, 3))

    def forward(self, x):
        return self.body(x)


class Blobs(Dataset):
    """Three Gaussian blobs in 6-D, served sample by sample (the DataLoader path)."""

    num_classes = 3

    def __init__(self, split: str, n: int = 96):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.x = torch.randn(n, 6, generator=g) * 0.5 + self.y[:, None].float()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


# --------------------------------------------------------------------------- other tasks (train.loss)


class SeqGRU(nn.Module):
    """A tiny recurrent language model: tokens [B, T] -> logits [B, T, V]."""

    def __init__(self, vocab: int = 12, width: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.gru = nn.GRU(width, width, batch_first=True)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens):
        h, _ = self.gru(self.embed(tokens))
        return self.head(h)


class Tokens(Dataset):
    """Sequences of a counting-mod-12 language: next token = (token + step) % 12, step per sequence.
    The first two targets of every sequence are -100 (ignored), so token counts differ from
    sample counts. n=101 divides by neither 2 nor 3."""

    vocab = 12

    def __init__(self, split: str, n: int = 101, length: int = 10):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        start = torch.randint(0, 12, (n, 1), generator=g)
        step = torch.randint(1, 4, (n, 1), generator=g)
        seq = (start + step * torch.arange(length + 1)) % 12
        self.x, self.y = seq[:, :-1].clone(), seq[:, 1:].clone()
        self.y[:, :2] = -100

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class Linear1(nn.Module):
    """A one-output regression model."""

    def __init__(self, features: int = 5):
        super().__init__()
        self.lin = nn.Linear(features, 1)

    def forward(self, x):
        return self.lin(x)


class Regression(Dataset):
    """y = x . w + 0.5 + noise, float targets [1]."""

    def __init__(self, split: str, n: int = 203, shape: str = "column"):
        g = torch.Generator().manual_seed(5 if split == "train" else 6)
        self.x = torch.randn(n, 5, generator=g)
        w = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
        self.y = (self.x @ w + 0.5 + 0.1 * torch.randn(n, generator=g))[:, None]
        if shape == "flat":
            self.y = self.y[:, 0]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def squared_error(output, target):
    """A custom loss by import path: per-element losses, no reduction."""
    return (output - target) ** 2


class TwoInputs(nn.Module):
    """A model with two named inputs (a dict batch: model(**inputs))."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(2, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, a, b):
        return self.head(torch.tanh(self.a(a) + self.b(b)))


class DictBlobs(Dataset):
    """Items {'a': [4], 'b': [2], 'target': class}."""

    def __init__(self, split: str, n: int = 97):
        g = torch.Generator().manual_seed(2 if split == "train" else 3)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.a = torch.randn(n, 4, generator=g) * 0.5 + self.y[:, None].float()
        self.b = torch.randn(n, 2, generator=g) * 0.5 - self.y[:, None].float()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"a": self.a[i], "b": self.b[i], "target": self.y[i]}


class OwnLoss(Linear1):
    """A model that brings its own loss: loss(batch) -> (sum, count)."""

    def loss(self, batch):
        x, y = batch
        per = (self(x) - y).abs()
        return per.sum(), per.numel()


class Triples(Regression):
    """A broken dataset: items are (x, y, extra)."""

    def __getitem__(self, i):
        return self.x[i], self.y[i], 0
