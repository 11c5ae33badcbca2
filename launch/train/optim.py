"""Optimizer, learning-rate schedule and mixed precision, built from the config."""

from __future__ import annotations

import contextlib
import math

import torch


def make_optimizer(cfg, params, capturable: bool = False) -> torch.optim.Optimizer:
    """capturable: AdamW keeps its step counters on the device, so a CUDA graph can hold its update.
    Only parameters that train are the optimizer's: a frozen base (LoRA) gets no state, not even an entry."""
    t = cfg.train
    params = [p for p in params if p.requires_grad]
    # On CUDA the fused kernels update every tensor in one launch (fewer launches per step
    # for small models); elsewhere torch's default implementation, so CPU results stay bitwise
    # comparable with a hand-written loop.
    fused = True if params and all(p.is_cuda for p in params) else None
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=fused, **({"capturable": True} if capturable else {}))
    return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, fused=fused)


def lr_factor(cfg, total_steps: int):
    """Multiplier of train.lr at optimizer step s (0-based), per step."""
    t = cfg.train

    def factor(s: int) -> float:
        if t.warmup_steps and s < t.warmup_steps:
            return (s + 1) / t.warmup_steps
        if t.schedule == "step":
            return t.gamma ** (s // t.step_every)
        if t.schedule == "cosine":
            span = max(1, total_steps - t.warmup_steps)
            progress = min(1.0, (s - t.warmup_steps) / span)
            return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor


def make_scheduler(cfg, optimizer, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, total_steps))


def make_scaler(cfg, device: torch.device):
    """fp16 needs loss scaling against gradient underflow; bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type) if cfg.train.precision == "fp16" else None


def autocast_context(cfg, device: torch.device):
    if cfg.train.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
