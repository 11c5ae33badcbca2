"""Fine-tuning is model construction: pretrained weights, `model.init_from`, LoRA, and what a checkpoint
of such a model holds. Nothing here is asked by the loop; the model it builds carries its own rules.

A model fine-tuned from a base (model.pretrained and/or model.init_from) whose parameters are partly
frozen (LoRA) saves only what trains: its `state_dict()` leaves the frozen parameters out, and its
`load_state_dict` does not miss them (the base supplies them, it is loaded before). Every checkpoint
path, whole or sharded, and model.pt therefore hold the adapters (and buffers), never the base; the
optimizer never had the base. The model also carries the base's identity (`Base`: where it came from
and a fingerprint of its weight files, launch.models.pretrained.fingerprint), which checkpoints record;
resuming against another base is refused in one line (`check_base`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from launch.errors import UserError

BASE = "_launch_base"


@dataclass
class Base:
    path: str  # model.pretrained, model.init_from, or both (joined by ' + ')
    fingerprint: str
    frozen: tuple  # state-dict names of the frozen parameters: read from the base, kept out of checkpoints

    def record(self) -> dict:
        return {"path": self.path, "fingerprint": self.fingerprint, "frozen": len(self.frozen)}


def base_of(model: nn.Module) -> Optional[Base]:
    return getattr(model, BASE, None)


def adapt(model: nn.Module, cfg, on_meta: bool, say) -> nn.Module:
    """init_from, then LoRA, then the rules for what its checkpoints hold."""
    from launch.models import lora, pretrained

    m = cfg.model
    sources, prints = [], []
    if m.pretrained:
        sources.append(m.pretrained)
        prints.append(pretrained.fingerprint(m.pretrained))
    late = None  # init_from weights that are a LoRA run's adapters: loaded once the adapters exist
    if m.init_from:
        weights, path, sha = read_init(m.init_from)
        if any(lora.is_adapter(k) for k in weights):
            late = (weights, path)
        else:
            load_strict(model, weights, path)
            sources.append(str(path))
            prints.append(sha)
    if m.lora.r:
        model, note = lora.apply(model, m.lora, cfg.log.debug)
        say(note)
        if not on_meta:  # on the meta device the adapters are drawn after sharding (launch.parallel.fsdp)
            lora.init_adapters(model, cfg.train.seed)
    if late is not None:
        load_strict(model, *late, frozen_ok=True)
    if m.init_from:
        say(f"model.init_from: started from {late[1] if late else sources[-1]}" + (" (a LoRA run's adapters)" if late else ""))
    if sources:
        frozen = tuple(n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad)  # tied weights under each name
        setattr(model, BASE, Base(" + ".join(sources), "-".join(prints), frozen))
        if frozen:
            _keep_base_out(model, set(frozen))
    return model


def _keep_base_out(model: nn.Module, frozen: set) -> None:
    def drop(module, state_dict, prefix, local_metadata):
        for name in frozen:
            state_dict.pop(prefix + name, None)

    def allow(module, incompatible):
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in frozen]

    model.register_state_dict_post_hook(drop)
    model.register_load_state_dict_post_hook(allow)


def read_init(source: str):
    """(state dict, its file, its sha256) of model.init_from: a weights file or a finished run directory."""
    from launch.checkpoint import integrity, store

    p = Path(source)
    if p.is_dir():
        if not (p / "model.pt").is_file():
            raise UserError(f"model.init_from={source}: a directory without model.pt (not a finished run directory?)")
        p = p / "model.pt"
    elif not p.is_file():
        raise UserError(f"model.init_from={source}: no such file or run directory")
    weights, _ = store.load_weights(p)  # verified against its manifest when it has one
    man = integrity.manifest_path(p)
    listed = integrity.read_manifest(man)["files"] if man.exists() else {}
    sha = (listed.get(p.name) or {}).get("sha256") or integrity.sha256_file(p)
    return weights, p, sha[:16]


def load_strict(model: nn.Module, weights: dict, path, frozen_ok: bool = False) -> None:
    """Load, refusing any mismatch in one line that names missing and unexpected keys and shapes."""
    own = model.state_dict()
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad} if frozen_ok else set()
    missing = [k for k in own if k not in weights and k not in frozen]
    unexpected = [k for k in weights if k not in own]
    shapes = [f"{k} {list(weights[k].shape)} in the file, {list(own[k].shape)} in the model" for k in weights if k in own and weights[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shapes differ", shapes)):
            if keys:
                parts.append(f"{what}: {', '.join(keys[:3])}" + (f" and {len(keys) - 3} more" if len(keys) > 3 else ""))
        raise UserError(f"model.init_from={path}: does not fit {type(model).__name__} ({'; '.join(parts)})")
    model.load_state_dict(weights, strict=not frozen_ok)


def check_base(ckpt: dict, model: nn.Module, origin) -> None:
    """A checkpoint without the frozen base resumes only onto the base it was trained from."""
    from launch.checkpoint.store import CheckpointError

    saved = ckpt.get("base")
    if not saved or not saved.get("frozen"):
        return  # it holds every weight
    mine = base_of(model)
    if mine is None:
        raise CheckpointError(f"checkpoint {origin}: holds only the trainable parameters of a model fine-tuned from {saved['path']}; this run has no such base (model.pretrained)")
    if mine.fingerprint != saved["fingerprint"]:
        raise CheckpointError(
            f"checkpoint {origin}: its trainable parameters belong to the base {saved['path']} (fingerprint {saved['fingerprint']}), "
            f"not to this run's {mine.path} ({mine.fingerprint}): resuming against another base is refused"
        )


def check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every parameter that trains is the optimizer's: a model that replaced parameters after the
    optimizer was built (some transformers models do at their first forward) would never train them."""
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    lost = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if lost:
        raise UserError(
            f"{len(lost)} trainable parameter(s) are not the optimizer's ({', '.join(lost[:3])}): the model replaced them after "
            "the optimizer was built, so they never trained; build such parameters in the model's constructor"
        )
