"""The seeds' NeuralNetwork MLP, or any user model by import path; plus prefix-free state dicts."""

from __future__ import annotations

import importlib

import torch
from torch import nn

from launch.errors import UserError


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


def import_object(path: str, what: str):
    """Resolve 'pkg.module:Name'."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"{what} '{path}': cannot import module '{module_name}' ({e})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UserError(f"{what} '{path}': module '{module_name}' has no '{attr}'") from None


def build_model(cfg, in_features: int, num_classes: int) -> nn.Module:
    m = cfg.model
    if m.in_features is not None and m.in_features != in_features:
        raise UserError(f"model.in_features={m.in_features} but the dataset has {in_features} features")
    if m.out_features is not None and m.out_features != num_classes:
        raise UserError(f"model.out_features={m.out_features} but the dataset has {num_classes} classes")
    if m.name == "mlp":
        return NeuralNetwork(in_features, list(m.hidden), num_classes)
    cls = import_object(m.name, "model.name")
    try:
        return cls(**m.kwargs)
    except TypeError as e:
        raise UserError(f"model.name '{m.name}': bad model.kwargs ({e})") from None


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
