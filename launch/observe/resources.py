"""Epoch-end resource figures and the gradient-norm probe; nothing here runs per step by default.

- ResourceMeter: process RSS and CPU% (since the previous record) summed over ranks, and with
  CUDA the peak allocated memory of every rank's device. One small all-reduce, so every rank
  calls it at the same point (the epoch end).
- GradNormProbe: the global gradient norm at one chosen optimizer step (the epoch's last), taken
  by an optimizer step pre-hook so the training loop itself stays untouched. Only used with
  log.tensorboard; other steps cost the hook's one integer comparison.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import psutil
import torch

from launch.processes.dist import Runtime, all_reduce_sum


class ResourceMeter:
    def __init__(self, rt: Runtime):
        self.rt = rt
        self.proc = psutil.Process()
        self._mark()

    def _mark(self) -> None:
        t = self.proc.cpu_times()
        self.cpu_s, self.wall_s = t.user + t.system, time.perf_counter()

    def figures(self) -> dict:
        """Collective. {'rss_mb', 'cpu_percent'} summed over ranks (+ 'cuda_peak_mb' per rank on CUDA)."""
        cpu_s, wall_s = self.cpu_s, self.wall_s
        self._mark()
        env, device = self.rt.env, self.rt.device
        cuda = device.type == "cuda"
        values = torch.zeros(2 + (env.world_size if cuda else 0), dtype=torch.float64)
        values[0] = self.proc.memory_info().rss / 2**20
        values[1] = 100.0 * (self.cpu_s - cpu_s) / max(self.wall_s - wall_s, 1e-9)
        if cuda:
            values[2 + env.rank] = torch.cuda.max_memory_allocated(device) / 2**20
        values = all_reduce_sum(values.to(device), self.rt).cpu().tolist()
        out = {"rss_mb": round(values[0], 1), "cpu_percent": round(values[1], 1)}
        if cuda:
            out["cuda_peak_mb"] = [round(v, 1) for v in values[2:]]
        return out


class GradNormProbe:
    """Records the L2 norm of all gradients when the optimizer takes step number `target`
    (1-based, as `current_step() + 1` before the step). Under DDP the gradients are already
    averaged then, and after clipping/unscaling, i.e. what the optimizer applies."""

    def __init__(self, optimizer: torch.optim.Optimizer, params, current_step: Callable[[], int], target: int):
        self.params = [p for p in params if p.requires_grad]
        self.current_step, self.target = current_step, target
        self.value: Optional[torch.Tensor] = None
        optimizer.register_step_pre_hook(self._hook)

    def _hook(self, optimizer, args, kwargs) -> None:
        if self.current_step() + 1 != self.target:
            return
        grads = [p.grad.detach() for p in self.params if p.grad is not None]
        if grads:  # stays on the device: read (synchronised) only at the epoch end
            self.value = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))

    def take(self, next_target: int) -> Optional[float]:
        """The recorded norm (None if that step did not happen); then watch `next_target`."""
        value, self.value, self.target = self.value, None, next_target
        return None if value is None else float(value)
