"""Batch statistics over the global micro-batch: BatchNorm under DDP computes what one process computes.

Plain BatchNorm under DDP normalises each rank's micro-batch with that rank's own mean and variance,
so k ranks of batch b do not compute the update of one process at batch k*b, and their running
statistics drift apart. torch's `nn.SyncBatchNorm` fixes the first on GPUs only (it refuses CPU
tensors) and counts every sample it is given, including the zero-weight stand-in a rank runs when an
uneven epoch end leaves it no sample (launch.data.order). So the launcher has its own, on every device:

- each BatchNorm layer's class is swapped for a subclass (isinstance checks, parameters, buffers and
  state_dict keys stay the user's), whose training forward sums x and x*x per channel in float64,
  all-reduces [sums, count] with autograd (the backward all-reduces the gradients of the sums, which
  is the exact gradient of the global statistics), and normalises with
  the global mean and biased variance;
- running statistics move with the global mean and the unbiased global variance, as torch does for
  one process, so every rank holds the same buffers;
- a stand-in batch (see `stand_in`) adds nothing to the sums or the count.
Evaluation (model.eval()) is torch's own BatchNorm with the running statistics: no collective.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

_weight = 1.0  # 0.0 while a rank runs a stand-in batch: its samples must not count


@contextlib.contextmanager
def stand_in(active: bool):
    """While active, this rank's batch is a zero-weight stand-in: it adds nothing to the statistics."""
    global _weight
    before, _weight = _weight, (0.0 if active else 1.0)
    try:
        yield
    finally:
        _weight = before


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class _GlobalStatistics:
    """Mixed into a BatchNorm class ahead of it: the training forward uses global statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        if x.dim() < 2:
            raise ValueError(f"{type(self).__name__}: expected input with a channel dimension, got {tuple(x.shape)}")
        dims = [0, *range(2, x.dim())]
        xd = x.double()
        local = torch.cat([xd.sum(dims), (xd * xd).sum(dims), xd.new_tensor([x.numel() / x.shape[1]])])
        if _weight != 1.0:
            local = local * _weight
        total = dist_nn_all_reduce(local)
        c = x.shape[1]
        n = total[2 * c]
        mean = total[:c] / n
        var = (total[c : 2 * c] / n - mean * mean).clamp(min=0)
        if self.track_running_stats and self.running_mean is not None:
            self._update_running(mean.detach(), var.detach() * n.detach() / (n.detach() - 1).clamp(min=1))
        shape = [1, c] + [1] * (x.dim() - 2)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.double()
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.double()
        y = x.float() * scale.float().view(shape) + shift.float().view(shape)
        return y.to(x.dtype) if x.dtype in (torch.float32, torch.float64) else y

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased_var.to(self.running_var.dtype), alpha=factor)


class _SumOverRanks(torch.autograd.Function):
    """An all-reduce (sum) whose backward all-reduces the gradient: what torch.distributed.nn's
    all_reduce does (deprecated in torch 2.13, with a warning on every rank)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def dist_nn_all_reduce(t: torch.Tensor) -> torch.Tensor:
    return _SumOverRanks.apply(t)


_classes: dict[type, type] = {}


def _global_class(cls: type) -> type:
    if cls not in _classes:
        _classes[cls] = type(f"Global{cls.__name__}", (_GlobalStatistics, cls), {"__module__": __name__})
    return _classes[cls]


def convert(model: nn.Module) -> int:
    """Swap every BatchNorm layer (BatchNorm1d/2d/3d, SyncBatchNorm, lazy ones) to global statistics,
    in place; returns how many. torch's own SyncBatchNorm is swapped too: it refuses CPU tensors."""
    layers = batchnorm_layers(model)
    for m in layers:
        if not isinstance(m, _GlobalStatistics):
            if isinstance(m, nn.SyncBatchNorm):  # its forward checks the device; the plain one does not
                m.__class__ = _global_class(_AnyDim)
            else:
                m.__class__ = _global_class(type(m))
    return len(layers)


class _AnyDim(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm that accepts any input rank (what SyncBatchNorm accepted)."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


def note_without_sync(layers: int) -> str:
    return (
        f"note: dist.sync_batchnorm=false: this model has {layers} BatchNorm layer(s), so under DDP each rank normalises "
        "with its own micro-batch's statistics: the updates differ from one process at the same global batch "
        "(dist.sync_batchnorm=auto makes them equal); evaluation uses rank 0's running statistics, the saved ones"
    )
