"""User code that fails while being built (tests/test_lifecycle.py): each failure must become one
line naming the module, the exception and this file's line."""

from torch import nn
from torch.utils.data import Dataset


def _scale(width):
    return width / 0  # ZeroDivisionError, one frame below the constructor


class BrokenNet(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.scale = _scale(width)


class StrictNet(nn.Module):
    """Takes only `width`: model.kwargs={depth: 3} is a TypeError from the call itself."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.body = nn.Linear(16, width)


class BrokenData(Dataset):
    def __init__(self, split: str, n: int = 10):
        raise FileNotFoundError(f"no such shard: /data/{split}-{n}.bin")

    def __len__(self):
        return 0

    def __getitem__(self, i):
        raise IndexError(i)
