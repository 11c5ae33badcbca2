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
