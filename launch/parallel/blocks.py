"""The model's blocks: the units that FSDP shards one by one and activation checkpointing recomputes."""

from __future__ import annotations

from torch import nn

from launch.errors import UserError


def blocks(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """The modules to shard one by one (before the root)."""
    if names:
        found = [m for m in model.modules() if type(m).__name__ in names and m is not model]
        if not found:
            classes = sorted({type(m).__name__ for m in model.modules() if m is not model})
            raise UserError(f"dist.fsdp_blocks={names}: no module of this model has that class (its classes: {', '.join(classes[:12])})")
        return found[::-1]  # innermost first: FSDP shards a module's children before the module
    lists = [child for m in model.modules() if isinstance(m, nn.ModuleList) for child in m]
    chosen = lists or list(model.children())
    return [m for m in chosen if any(True for _ in m.parameters())][::-1]


def activation_checkpointing(block: nn.Module) -> None:
    """Recompute the block's activations in the backward instead of keeping them. The block keeps
    its class and its state_dict keys; the FSDP hooks on it gather the parameters for the recompute."""
    from torch.utils.checkpoint import checkpoint

    forward = block.forward

    def recomputed(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = recomputed
