"""Tensor parallel (dist.tp): the model's own plan, or yours, applied with torch's parallelize_module.

Where the plan comes from: model.tp_plan=pkg.module:fn is called as fn(model, tp_mesh) (with
sequence_parallel=True under dist.sequence_parallel); else a Hugging Face model's own plan: its
`_tp_plan` (module-name patterns, `*` for a layer number, mapped to style names; taken from the model or
the first submodule that has one, e.g. under a peft wrapper) or its config's `base_model_tp_plan`.
HF's style names map to torch's styles (Megatron's pair: a colwise Linear's output features and the
next rowwise Linear's input features split over the group, one all-reduce after the pair):

    colwise                               ColwiseParallel()          input whole, output split
    rowwise                               RowwiseParallel()          input split, output summed
    colwise_rep, colwise_gather_output    ColwiseParallel(output_layouts=Replicate())
    rowwise_rep, rowwise_split_input      RowwiseParallel(input_layouts=Replicate())
    embedding_rowwise                     RowwiseParallel(input_layouts=Replicate()): the vocabulary split
    embedding_colwise                     ColwiseParallel(output_layouts=Replicate()): each vector split
    replicate                             left whole

Any other style (packed weights, experts) stops the run with one line naming it. dist.sequence_parallel
keeps the activations between the pairs split along the sequence (torch's SequenceParallel on the norms
between them; a colwise layer gathers the sequence, a rowwise one reduce-scatters it) where the plan has
that form: it starts at an embedding entry and ends at a gathered output head. The activations then
travel as DTensors, so the model's own code sees whole-sequence shapes (positions, masks).

Checked before any process group work: the config's attention heads, key/value heads, hidden and
intermediate sizes and every planned Linear's split features divide by T.

A LoRA-wrapped Linear (peft's LoraLayer keeps the original as `base_layer`) follows its entry: colwise
splits the base and lora_B's outputs (lora_A sees the whole input), rowwise splits the base and
lora_A's inputs (its rank-r output summed over the group, lora_B whole).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn

from launch.errors import UserError
from launch.user_code import call, import_object

MEGATRON = ("colwise", "rowwise", "colwise_rep", "colwise_gather_output", "embedding_rowwise", "embedding_colwise", "replicate")
STYLES = MEGATRON + ("rowwise_rep", "rowwise_split_input", "sequence_parallel")
SIZES = (("num_attention_heads", "attention heads", "each rank computes whole heads"),
         ("num_key_value_heads", "key/value heads", "each rank keeps whole key/value heads"),
         ("hidden_size", "hidden size", "the rowwise layers' inputs split"),
         ("intermediate_size", "intermediate size", "the MLP's colwise outputs split"))


@dataclass
class Plan:
    """What dist.tp does to this model: the user's function, or module name -> style name."""

    source: str  # "model.tp_plan=..." or "the Hugging Face plan of X"
    fn: Optional[Callable] = None
    entries: dict = field(default_factory=dict)
    norms: list = field(default_factory=list)  # sequence parallel: the norms between the pairs


def plan_for(model: nn.Module, cfg, t: int) -> Plan:
    """The plan, checked against the model and T (raises UserError; no process group needed)."""
    _check_sizes(model, t)
    sp, name = cfg.dist.sequence_parallel, type(model).__name__
    if cfg.model.tp_plan:
        fn = import_object(cfg.model.tp_plan, "model.tp_plan", cfg.log.debug)
        if sp and "sequence_parallel" not in inspect.signature(fn).parameters:
            raise UserError(f"dist.sequence_parallel: model.tp_plan '{cfg.model.tp_plan}' takes no sequence_parallel argument; add one (fn(model, tp_mesh, sequence_parallel=False)) or set dist.sequence_parallel=false")
        return Plan(f"model.tp_plan={cfg.model.tp_plan}", fn=fn)
    patterns = model_plan(model)
    if not patterns:
        raise UserError(
            f"dist.tp={t}: {name} has no tensor-parallel plan (no Hugging Face _tp_plan or config.base_model_tp_plan); "
            "set model.tp_plan=pkg.module:fn, a function fn(model, tp_mesh) that splits it with torch's parallelize_module"
        )
    plan = Plan(f"the Hugging Face plan of {name}", entries=_expand(model, patterns))
    if not plan.entries:
        raise UserError(f"dist.tp: the tensor-parallel plan of {name} names no module of it ({', '.join(list(patterns)[:3])}, ...); set model.tp_plan=pkg.module:fn")
    for module_name, style in plan.entries.items():
        if style not in STYLES:
            raise UserError(f"dist.tp: {plan.source} gives {module_name} the style '{style}', which launch does not map to torch's parallelize_module; set model.tp_plan=pkg.module:fn to split the model yourself")
        _check_module(model.get_submodule(module_name), module_name, style, t)
    if sp:
        _sequence_parallel(model, plan)
    return plan


def model_plan(model: nn.Module) -> dict:
    """A Hugging Face model's plan with full module-name patterns ({} when it has none): from the
    outermost module whose plan names modules under it (a wrapper such as peft's PeftModel forwards
    attribute reads to the model inside, whose plan then names nothing under the wrapper)."""
    first = {}
    for prefix, m in model.named_modules():
        lead = f"{prefix}." if prefix else ""
        patterns = {lead + k: v for k, v in (getattr(m, "_tp_plan", None) or {}).items()}
        base = getattr(getattr(m, "config", None), "base_model_tp_plan", None)
        if not patterns and base:
            inner = getattr(m, "base_model_prefix", "")
            inner = f"{inner}." if inner and isinstance(getattr(m, inner, None), nn.Module) else ""
            patterns = {lead + inner + k: v for k, v in base.items()}
        if patterns and _expand(model, patterns):
            return patterns
        first = first or patterns
    return first


def _expand(model: nn.Module, patterns: dict) -> dict:
    """Module name -> style for every module a pattern names ('*' stands for one name part)."""
    compiled = [(re.compile("^" + re.escape(p).replace(r"\*", r"[^.]+") + "$"), s) for p, s in patterns.items()]
    out = {}
    for name, _ in model.named_modules():
        for rx, style in compiled:
            if name and rx.match(name):
                out[name] = style
                break
    return out


def _check_sizes(model: nn.Module, t: int) -> None:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr, what, why in SIZES:
        value = getattr(text, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value % t:
            raise UserError(f"dist.tp={t}: the model's {what} ({attr}={value}) do not divide by {t} ({why}); choose a dist.tp that divides {value}")


def _check_module(module: nn.Module, name: str, style: str, t: int) -> None:
    """A pair's inner features must split evenly (the next layer reshapes them into whole heads); a
    gathered output head or an embedding may split unevenly (DTensor pads)."""
    base = getattr(module, "base_layer", module)
    if not isinstance(base, nn.Linear) or style not in ("colwise", "rowwise"):
        return
    split = base.out_features if style == "colwise" else base.in_features
    if split % t:
        which = "output" if style == "colwise" else "input"
        raise UserError(f"dist.tp={t}: {name} ({style}) has {split} {which} features, which do not divide by {t}; choose a dist.tp that divides {split}")


def _sequence_parallel(model: nn.Module, plan: Plan) -> None:
    """The norms between the pairs (sequence parallel), or one line on why this plan cannot split the sequence."""
    styles = set(plan.entries.values())
    odd = sorted(styles - set(MEGATRON) - {"sequence_parallel"})
    starts = any(s.startswith("embedding_") for s in styles)
    ends = bool(styles & {"colwise_rep", "colwise_gather_output"})
    if odd or not starts or not ends:
        why = f"its style(s) {', '.join(odd)}" if odd else "it does not start at an embedding entry and end at a gathered output head"
        raise UserError(f"dist.sequence_parallel: {plan.source} cannot split the sequence ({why}); set model.tp_plan=pkg.module:fn with sequence_parallel, or dist.sequence_parallel=false")
    if any(hasattr(model.get_submodule(n), "base_layer") for n in plan.entries):
        raise UserError("dist.sequence_parallel: LoRA adapters see whole-sequence inputs; set dist.sequence_parallel=false")
    paired = {n.rpartition(".")[0] for n, s in plan.entries.items() if s in ("colwise", "rowwise")}
    plan.norms = [n for n, m in model.named_modules()
                  if n and n not in plan.entries and type(m).__name__.endswith("Norm") and n.rpartition(".")[0] not in paired]


def apply(model: nn.Module, tp_mesh, plan: Plan, cfg) -> None:
    """Split the model over the tensor-parallel mesh (collective: every rank of the group)."""
    from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

    sp = cfg.dist.sequence_parallel
    tied = _shared(model)
    if plan.fn is not None:
        extra = {"sequence_parallel": True} if sp else {}
        call(plan.source, plan.fn, model, tp_mesh, debug=cfg.log.debug, **extra)
    else:
        styles = {}
        for name, style in plan.entries.items():
            styles.update(_torch_styles(model.get_submodule(name), name, style, sp))
        styles.update({n: SequenceParallel(use_local_output=False) for n in plan.norms})
        parallelize_module(model, tp_mesh, styles)
    _retie(model, tied)


def _torch_styles(module: nn.Module, name: str, style: str, sp: bool) -> dict:
    if style == "replicate":
        return {}
    if hasattr(module, "base_layer"):  # peft's LoraLayer: the base and one side of each adapter
        if style not in ("colwise", "rowwise"):
            raise UserError(f"dist.tp: {name} carries LoRA adapters and the style '{style}'; only colwise and rowwise layers can carry them under tensor parallel")
        side = "lora_B" if style == "colwise" else "lora_A"
        out = {f"{name}.base_layer": _torch_style(style, sp)}
        out.update({f"{name}.{side}.{a}": _torch_style(style, sp) for a in getattr(module, side)})
        return out
    return {name: _torch_style(style, sp)}


def _torch_style(style: str, sp: bool):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    whole, seq = Replicate(), Shard(1)
    if style == "colwise":
        return ColwiseParallel(input_layouts=seq) if sp else ColwiseParallel()
    if style == "rowwise":
        return RowwiseParallel(output_layouts=seq, use_local_output=False) if sp else RowwiseParallel()
    if style in ("colwise_rep", "colwise_gather_output"):
        return ColwiseParallel(input_layouts=seq if sp else whole, output_layouts=whole)
    if style in ("rowwise_rep", "rowwise_split_input"):
        return RowwiseParallel(input_layouts=whole)
    if style == "embedding_rowwise":
        return RowwiseParallel(input_layouts=whole, output_layouts=seq, use_local_output=False) if sp else RowwiseParallel(input_layouts=whole)
    if style == "embedding_colwise":
        return ColwiseParallel(output_layouts=seq, use_local_output=False) if sp else ColwiseParallel(output_layouts=whole)
    return SequenceParallel()  # "sequence_parallel" (plan_for admits no other name)


def _shared(model: nn.Module) -> list[list[str]]:
    """Names of parameters that several modules share (tied embeddings), by the object they share."""
    seen: dict = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        seen.setdefault(id(p), []).append(name)
    return [names for names in seen.values() if len(names) > 1]


def _retie(model: nn.Module, tied: list[list[str]]) -> None:
    """parallelize_module replaces a module's parameters one module at a time: put a shared one back
    in every place, where its places were split alike (a tied embedding and output head both split
    their vocabulary rows), else one line."""
    for names in tied:
        params = [model.get_parameter(n) for n in names]
        if all(p is params[0] for p in params):
            continue
        layouts = {tuple(getattr(p, "placements", ())) for p in params}
        split = [p for p in params if hasattr(p, "placements")]
        if len(layouts) > 1 or not split:
            raise UserError(f"dist.tp: {' and '.join(names)} share one parameter that the plan splits differently; untie them or set model.tp_plan=pkg.module:fn")
        for n in names:
            owner, _, leaf = n.rpartition(".")
            model.get_submodule(owner).register_parameter(leaf, split[0])
