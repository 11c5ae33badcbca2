"""User code that fails: each failure must become one line naming this file and line."""

from torch import nn
from torch.utils.data import Dataset


class BrokenNet(nn.Module):
    def __init__(self):
        super().__init__()
        raise ValueError("the model cannot be built")  # line 10


class BrokenData(Dataset):
    def __init__(self, split):
        self.n = 1 / 0  # line 15


def helper():
    return undefined_name  # noqa: F821
