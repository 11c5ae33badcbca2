"""A user module whose body fails at import (tests/test_lifecycle.py)."""

from torch import nn

HIDDEN = [32, 16]
WIDTH = HIDDEN[0] * undefined_factor  # noqa: F821  NameError while importing


class Net(nn.Module):
    pass
