"""User code for tests/test_predict.py: datasets without `num_classes` (as torchvision's ImageFolder and
Hugging Face datasets are), and models, datasets, losses and metrics reached as `pkg.module:Class.method`."""

import torch
from torch import nn
from torch.utils.data import Dataset


def blobs(split: str, n: int):
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    y = torch.randint(0, 3, (n,), generator=g)
    return torch.randn(n, 6, generator=g) * 0.5 + y[:, None].float(), y


class Folder(Dataset):
    """ImageFolder's interface: a `classes` list of names and integer targets, no num_classes."""

    classes = ["cat", "dog", "eel"]

    def __init__(self, split: str, n: int = 60):
        self.x, self.y = blobs(split, n)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class Bare(Folder):
    """Neither num_classes nor class names."""

    classes = None


class ClassLabel:
    def __init__(self, names):
        self.names = names


class HFLike(Folder):
    """A Hugging Face Dataset's interface: dict items, `features` with a ClassLabel for the target."""

    classes = None
    features = {"x": None, "target": ClassLabel(["north", "south", "west"])}

    def __getitem__(self, i):
        return {"x": self.x[i], "target": self.y[i]}


class Net(nn.Module):
    def __init__(self, outputs: int = 3):
        super().__init__()
        self.body = nn.Linear(6, outputs)

    def forward(self, x):
        return self.body(x)


class MultiLabel(Folder):
    """Two labels per sample (float 0/1 targets [2]) for bce_with_logits."""

    classes = ["big", "odd"]

    def __getitem__(self, i):
        return self.x[i], torch.stack([(self.x[i].sum() > 6).float(), (self.y[i] % 2).float()])


class Factory:
    """Everything built by a classmethod or staticmethod, as transformers:AutoModelForCausalLM.from_config is."""

    @classmethod
    def model(cls, outputs: int = 3) -> nn.Module:
        return Net(outputs)

    @staticmethod
    def data(split: str, n: int = 60) -> Dataset:
        return Bare(split, n)

    @staticmethod
    def loss(output, target):
        return nn.functional.cross_entropy(output, target, reduction="none")

    @staticmethod
    def hits(output, target) -> float:
        return (output.argmax(dim=1) == target).float().mean().item()
