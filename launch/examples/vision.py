"""A torchvision-style image classifier: BatchNorm CNN, random augmentation in DataLoader workers.

What most vision models have and the launcher must keep exact for (see README "Exactness"):
- BatchNorm: statistics over the global micro-batch under DDP (dist.sync_batchnorm=auto), so two
  processes at batch b compute what one process at batch 2b computes;
- random augmentation in `__getitem__` (a flip and a shift, drawn from torch's global generator as
  torchvision's transforms do): every sample is loaded right after seeding with (seed, epoch, index),
  so the same sample gets the same flip for any data.num_workers, world size or resume point.

    python train_single.py --config configs/vision.yaml
    python train_ddp.py --nproc 2 --config configs/vision.yaml data.batch_size=32

The images are generated here (no download): 3x16x16 stripes whose orientation and period are the
class (4 classes), plus noise. Flips and shifts keep the class, as they would for photographs.
A real torchvision model takes the same data: `model.name=torchvision.models:resnet18
model.kwargs={num_classes: 4}` (see docs/data.md for installing torchvision next to the CPU torch).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

CLASSES = ("horizontal-2", "horizontal-4", "vertical-2", "vertical-4")


class Stripes(Dataset):
    """Item i: (image [3, size, size] float, class). Training items are randomly flipped and shifted."""

    num_classes = len(CLASSES)

    def __init__(self, split: str, n: int = 2000, n_eval: int = 500, size: int = 16, noise: float = 0.8, seed: int = 0, augment: bool = True):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        count = n if split == "train" else n_eval
        g = torch.Generator().manual_seed(seed * 2 + (split == "eval"))
        self.labels = torch.randint(0, len(CLASSES), (count,), generator=g)
        phase = torch.randint(0, 4, (count,), generator=g)
        coords = torch.arange(size)
        period = torch.where(self.labels % 2 == 0, 2, 4)[:, None]
        wave = (((coords[None, :] + phase[:, None]) // (period // 2)) % 2).float() * 2 - 1  # [count, size]
        horizontal = (self.labels < 2)[:, None, None]
        pattern = torch.where(horizontal, wave[:, :, None].expand(-1, -1, size), wave[:, None, :].expand(-1, size, -1))
        self.images = pattern[:, None].repeat(1, 3, 1, 1) + noise * torch.randn(count, 3, size, size, generator=g)
        self.augment = augment and split == "train"

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = self.images[i]
        if self.augment:  # torch's global generator, as torchvision's RandomHorizontalFlip / RandomCrop draw
            if torch.rand(()) < 0.5:
                img = img.flip(-1)
            dy, dx = torch.randint(-2, 3, (2,)).tolist()
            img = img.roll((dy, dx), dims=(1, 2))
        return img, self.labels[i]


class ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
        )

    def forward(self, x):
        return torch.relu(x + self.body(x))


class SmallResNet(nn.Module):
    """conv-BN-ReLU stem, `blocks` residual blocks with BatchNorm, global average pooling, dropout, a linear head."""

    def __init__(self, num_classes: int = len(CLASSES), width: int = 16, blocks: int = 2, dropout: float = 0.0):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(*(ResidualBlock(width) for _ in range(blocks)))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(width, num_classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))
