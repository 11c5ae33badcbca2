"""The seeds' NeuralNetwork MLP, or any user model by import path; plus prefix-free state dicts."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from launch.errors import UserError
from launch.user_code import build_kwargs, call, import_object


class NeuralNetwork(nn.Module):
    """Linear-ReLU-...-Linear; returns logits (the loss applies softmax)."""

    def __init__(self, in_features: int, hidden: list[int], out_features: int):
        super().__init__()
        widths = [in_features, *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], out_features))
        self.linear_relu_stack = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_relu_stack(x)


def build_model(cfg, in_features: int, num_classes: Optional[int], rt=None, say=None) -> nn.Module:
    """model.name -> the bare model. `num_classes` is the dataset's output width (classes, or 1
    for a one-target regression); None when the dataset does not say. With `rt` (a run) the model is
    on its device; or on the meta device: a pretrained model that FSDP shards before it reads its
    weights (launch.models.shards). model.pretrained, model.init_from and model.lora: launch.models.finetune."""
    m = cfg.model
    say = say or (lambda msg: None)
    on_meta = bool(rt is not None and m.pretrained and not m.init_from and cfg.dist.strategy == "fsdp" and rt.env.world_size > 1)
    if m.pretrained:
        from launch.models import pretrained

        model = pretrained.build(cfg, on_meta, say)
    else:
        model = _plain(cfg, in_features, num_classes)
    if m.pretrained or m.init_from or m.lora.r:
        from launch.models import finetune

        model = finetune.adapt(model, cfg, _on_meta(model), say)
    if rt is not None and not _on_meta(model):
        model = model.to(rt.device)
    return model


def _on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _plain(cfg, in_features: int, num_classes: Optional[int]) -> nn.Module:
    m = cfg.model
    if m.in_features is not None and m.in_features != in_features:
        raise UserError(f"model.in_features={m.in_features} but the dataset has {in_features} features")
    if m.out_features is not None and num_classes is not None and m.out_features != num_classes:
        raise UserError(f"model.out_features={m.out_features} but the dataset has {num_classes} classes")
    if m.name == "mlp":
        out = num_classes or m.out_features
        if out is None:
            raise UserError("model.name=mlp: the dataset does not say how many outputs it needs; set model.out_features")
        return NeuralNetwork(in_features, list(m.hidden), out)
    cls = import_object(m.name, "model.name", cfg.log.debug)
    return call(f"model.name '{m.name}'", cls, debug=cfg.log.debug, **build_kwargs(m.kwargs, "model.kwargs", cfg.log.debug))


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def clean_state_dict(state: dict) -> dict:
    """Strip 'module.' / '_orig_mod.' prefixes so weights load strict=True into a bare model anywhere."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in ("module.", "_orig_mod."):
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out
