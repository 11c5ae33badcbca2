"""model.lora: LoRA adapters through peft (the optional extra .[peft]); the base stays frozen.

`apply` checks the targets against the model's modules first (a name that matches nothing is one line
naming modules that exist), expands `all-linear` itself (every linear layer but the output head, also
for models that are not Hugging Face ones) and wraps the model with `peft.get_peft_model`. peft sets
requires_grad=False on the base before any wrapper exists, so DDP's reducer and FSDP's reduce-scatter
see only the adapters, and the optimizer gets only them (launch.train.optim); peft keeps the adapters
in fp32 over a bf16/fp16 base.

The adapters' initial values are the launcher's, not the global generator's: lora_A is drawn from
U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (peft's kaiming-uniform default) by a generator seeded with
(train.seed, the parameter's name), lora_B is zero. So a model built whole in one process and one
built on the meta device and sharded over k ranks start from the same adapters, bit for bit.
"""

from __future__ import annotations

import math
import warnings
import zlib

import torch
from torch import nn

from launch.errors import UserError

ADAPTER_MARKS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.")
TASKS = (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
         ("ForQuestionAnswering", "QUESTION_ANS"), ("ForConditionalGeneration", "SEQ_2_SEQ_LM"))


def _peft():
    try:
        import peft
    except ImportError:
        raise UserError("model.lora.r > 0 needs peft: pip install -e '.[peft]'") from None
    # peft asks transformers 5 a deprecated question on every wrap and save, once per rank
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    return peft


def _linear_types() -> tuple:
    kinds = [nn.Linear]
    try:
        from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

        kinds.append(Conv1D)
    except ImportError:
        pass
    return tuple(kinds)


def _output_layer(model: nn.Module):
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    if out is not None:
        return out
    linears = [m for m in model.modules() if isinstance(m, _linear_types())]
    return linears[-1] if linears else None


def matches(name: str, target: str) -> bool:
    """peft's rule for a target in a list: the module's full name, or its dotted suffix."""
    return name == target or name.endswith("." + target)


def targets(model: nn.Module, wanted: list[str]) -> tuple[list[str], str]:
    """(full module names to adapt, how they were chosen); one line if a target matches nothing."""
    names = [n for n, _ in model.named_modules() if n]
    if wanted == ["all-linear"]:
        head = _output_layer(model)
        chosen = [n for n, m in model.named_modules() if n and isinstance(m, _linear_types()) and m is not head]
        if not chosen:
            raise UserError(f"model.lora.targets=[all-linear]: {type(model).__name__} has no linear layer besides its output layer; name the modules (model.lora.targets)")
        head_name = next((n for n, m in model.named_modules() if m is head), None)
        return chosen, "all-linear" + (f", not the output layer {head_name}" if head_name else "")
    if "all-linear" in wanted:
        raise UserError("model.lora.targets: 'all-linear' stands alone (no other names beside it)")
    for t in wanted:
        if not any(matches(n, t) for n in names):
            leaves = list(dict.fromkeys(n.rpartition(".")[2] for n, m in model.named_modules() if n and isinstance(m, _linear_types())))
            some = ", ".join(leaves[:8]) or ", ".join(names[:8])
            raise UserError(f"model.lora.targets: '{t}' matches no module of {type(model).__name__} (its linear layers: {some}; or [all-linear])")
    return [n for n in names if any(matches(n, t) for t in wanted)], ", ".join(wanted)


def apply(model: nn.Module, lora, debug: bool = False) -> tuple[nn.Module, str]:
    """The model with LoRA adapters (a peft PeftModel), and the start-up line saying what trains."""
    peft = _peft()
    chosen, how = targets(model, list(lora.targets))
    kind = next((task for suffix, task in TASKS if type(model).__name__.endswith(suffix)), None)
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=chosen, task_type=kind)
    total = sum(p.numel() for p in model.parameters())
    try:
        wrapped = peft.get_peft_model(model, config)
    except (ValueError, TypeError, RuntimeError) as e:
        text = " ".join(str(e).split())
        found = next((n for n in chosen if text.startswith("Target module") and type(model.get_submodule(n)).__name__ in text), None)
        what = f"{found} ({type(model.get_submodule(found)).__name__})" if found else "the targets"
        raise UserError(f"model.lora: peft cannot put LoRA on {what}: {text[:240]}") from None
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    whole = sorted({n.split(".modules_to_save")[0].removeprefix("base_model.model.") for n, p in wrapped.named_parameters() if p.requires_grad and not is_adapter(n)})
    note = (f"LoRA r={lora.r} alpha={lora.alpha:g} on {len(chosen)} modules ({how}): {trainable:,} trainable parameters, "
            f"{100 * trainable / max(total, 1):.2f}% of the base's {total:,}, which stay frozen" + (f"; trained whole: {', '.join(whole)}" if whole else ""))
    return wrapped, note


def is_adapter(name: str) -> bool:
    return any(mark in name for mark in ADAPTER_MARKS)


@torch.no_grad()
def init_adapters(model: nn.Module, seed: int) -> None:
    """Every adapter from its own generator (train.seed, name): the same values however the model is
    built or sharded. Sharded parameters get only their rows (lora.put)."""
    for name, p in model.named_parameters():
        if not is_adapter(name):
            continue
        g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
        if ".lora_A." in name:
            bound = 1.0 / math.sqrt(max(1, p[0].numel()))
            full = (torch.rand(tuple(p.shape), generator=g, dtype=torch.float64) * 2 - 1) * bound
        elif ".lora_embedding_B." in name:
            full = torch.randn(tuple(p.shape), generator=g, dtype=torch.float64)
        else:
            full = torch.zeros(tuple(p.shape), dtype=torch.float64)
        put(p, full)


def put(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole tensor's values into a parameter, or into this rank's rows of a sharded one."""
    local = getattr(p, "_local_tensor", None)
    if local is None:
        p.data.copy_(full.to(p.dtype))
        return
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    piece = full[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
    local.copy_(piece.to(local.dtype))
