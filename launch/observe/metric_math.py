"""The math of the set metrics, exact over all predictions: AUROC from ranks, macro F1 from counts.

AUROC is the Mann-Whitney statistic: the probability that a positive scores above a negative, ties
counting one half, computed from average ranks in float64 (rank sums stay exact integers or halves
up to 2**53, about 10**8 elements); the scores are ranked as given (float32), never rounded first.
It equals the area under the trapezoidal ROC curve that scikit-learn draws, without thresholds or
binning. Written here rather than taken from torchmetrics: torchmetrics 1.9 returns float32 values
and counts a class without positives as AUROC 0 in its macro average; see docs/data.md ("Metrics").
"""

from __future__ import annotations

import math

import torch

CHUNK = 1 << 22  # score entries ranked at once in the one-vs-rest loop (about 100 MB of work tensors)


def positive_rank_sums(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Per row of `scores` [R, M]: the sum of the 1-based ranks of the positives ([R, M] bool), tied
    scores sharing their average rank (float64). One sort per row, then linear passes: a tie group
    spanning sorted positions a..b ranks (a + b + 2) / 2."""
    values, order = scores.sort(dim=-1)
    pos = positive.gather(-1, order)
    m = values.shape[-1]
    at = torch.arange(m, device=values.device).expand_as(values)
    first = torch.ones_like(pos)
    first[..., 1:] = values[..., 1:] != values[..., :-1]
    last = torch.ones_like(pos)
    last[..., :-1] = first[..., 1:]
    start = torch.where(first, at, 0).cummax(dim=-1).values
    end = torch.where(last, at, m).flip(-1).cummin(dim=-1).values.flip(-1)
    return ((start + end + 2).double() / 2 * pos).sum(dim=-1)


def _auc(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """AUROC per row of scores [R, M] with positives [R, M]; NaN where a row lacks positives or negatives."""
    p = positive.sum(dim=-1).double()
    n = positive.shape[-1] - p
    u = positive_rank_sums(scores, positive) - p * (p + 1) / 2
    return torch.where((p > 0) & (n > 0), u / (p * n), torch.full_like(u, math.nan))


def auroc_binary(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Binary AUROC of `scores` [M] against `positive` [M] (bool); NaN without both classes or with NaN scores."""
    if scores.numel() == 0 or bool(torch.isnan(scores).any()):
        return math.nan
    return float(_auc(scores[None], positive[None].to(scores.device)))


def auroc_ovr_macro(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """One-vs-rest AUROC per class (column c of `scores` [M, C] ranks class c against the rest), averaged
    over the classes that have both positives and negatives among `labels`; NaN if none has."""
    if scores.numel() == 0 or bool(torch.isnan(scores).any()):
        return math.nan
    m, classes = scores.shape
    per_class = []
    step = max(1, CHUNK // max(1, m))
    for first in range(0, classes, step):
        cols = torch.arange(first, min(classes, first + step), device=scores.device)
        block = scores[:, cols].T.contiguous()
        per_class.append(_auc(block, labels[None, :] == cols[:, None]))
    auc = torch.cat(per_class)
    defined = auc[~torch.isnan(auc)]
    return float(defined.mean()) if defined.numel() else math.nan


def f1_macro(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> float:
    """Macro F1 from per-class counts: F1_c = 2 tp / (2 tp + fp + fn), averaged over the classes that
    occur among the targets or the predictions (scikit-learn's default labels); NaN if none does."""
    tp, fp, fn = tp.double(), fp.double(), fn.double()
    seen = (tp + fp + fn) > 0
    if not bool(seen.any()):
        return math.nan
    return float((2 * tp[seen] / (2 * tp[seen] + fp[seen] + fn[seen])).mean())
