"""Import-path metrics for tests/test_metrics.py: fn(predictions, targets) -> float."""

from __future__ import annotations

import torch

calls: list[tuple[torch.Tensor, torch.Tensor]] = []  # what each call was given, for the test to compare


def record(predictions, targets):
    """Keeps what it was given; the number of samples."""
    calls.append((predictions.clone(), targets.clone()))
    return float(predictions.shape[0])


def exact_match(predictions, targets):
    """Sequences whose counted tokens (targets other than -100) are all predicted right: an order-free set metric."""
    right = (predictions.argmax(dim=-1) == targets) | (targets == -100)
    return right.all(dim=1).double().mean()


def not_a_number(predictions, targets):
    return "high"


def broken(predictions, targets):
    raise ValueError("no metric today")
