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
    chosen = lists + _repeated_in_sequentials(model, {id(c) for c in lists})
    chosen = chosen or list(model.children())
    return [m for m in chosen if any(True for _ in m.parameters())][::-1]


def _repeated_in_sequentials(model: nn.Module, taken: set) -> list[nn.Module]:
    """Repeated blocks kept in an nn.Sequential (timm's ViT: `blocks = nn.Sequential(*[Block(...)])`):
    the children of a class that occurs at least twice with parameters, in the outermost such
    Sequential only (not inside a block already chosen)."""
    found: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        if id(m) in taken:
            return
        if isinstance(m, nn.Sequential):
            kinds = [type(c) for c in m.children() if any(True for _ in c.parameters())]
            repeated = [c for c in m.children() if kinds.count(type(c)) >= 2 and any(True for _ in c.parameters())]
            if repeated:
                found.extend(repeated)
                return
        for c in m.children():
            visit(c)

    visit(model)
    return found


def trainable_groups(block: nn.Module, inside: set) -> list[nn.Module]:
    """The modules of a block (or of the root, outside the blocks in `inside`) whose parameters all
    train, when the block also has frozen ones (LoRA adapters in a frozen layer): sharded as a unit of
    their own, so no unit mixes frozen and trainable parameters, or fp32 adapters with a bf16 base."""
    params = [p for m in _own_modules(block, inside) for p in m.parameters(recurse=False)]
    if not params or all(p.requires_grad for p in params) or not any(p.requires_grad for p in params):
        return []
    picked: list[nn.Module] = []
    covered: set = set()
    for m in _own_modules(block, inside):
        own = list(m.parameters(recurse=False))
        if id(m) in covered or not own or not all(p.requires_grad for p in own):
            continue
        subtree = list(m.modules())
        if all(p.requires_grad for s in subtree for p in s.parameters(recurse=False)):
            picked.append(m)
            covered |= {id(s) for s in subtree}
    return picked


def _own_modules(block: nn.Module, inside: set):
    """The block's modules, not descending into those in `inside` (units sharded already)."""
    stack = [block]
    while stack:
        m = stack.pop()
        yield m
        stack.extend(c for c in reversed(list(m.children())) if id(c) not in inside)


def describe(model: nn.Module, units: list[nn.Module]) -> str:
    """'4 x Block (blocks.0 .. blocks.3)' for the start-up line."""
    names = {id(m): n for n, m in model.named_modules()}
    kinds: dict[str, list[str]] = {}
    for u in units[::-1]:
        kinds.setdefault(type(u).__name__, []).append(names.get(id(u), "?"))
    return ", ".join(f"{len(v)} x {k} ({v[0]}{' .. ' + v[-1] if len(v) > 1 else ''})" for k, v in kinds.items())


def activation_checkpointing(block: nn.Module) -> None:
    """Recompute the block's activations in the backward instead of keeping them. The block keeps
    its class and its state_dict keys; the FSDP hooks on it gather the parameters for the recompute."""
    from torch.utils.checkpoint import checkpoint

    forward = block.forward

    def recomputed(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = recomputed
