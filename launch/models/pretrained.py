"""model.pretrained: a model from a local Hugging Face checkpoint directory, and the base's identity.

`model.name=transformers:AutoModelForCausalLM model.pretrained=DIR` builds `Class.from_pretrained(DIR,
**model.kwargs)`: any class with `from_pretrained` (AutoModelForSequenceClassification too). Nothing is
downloaded: DIR must hold config.json and weight files (*.safetensors, or pytorch_model*.bin), or the
run stops in one line naming what is missing.

Under dist.strategy=fsdp with more than one rank the model is built on the meta device instead, and
after sharding each rank reads only its own rows of every tensor from the safetensors files
(launch.models.shards): no rank ever holds the whole model. That needs safetensors files that hold
every parameter under the model's own names; otherwise (old .bin files, renamed keys, a head that
from_pretrained would initialise) every rank loads the whole model once and shards it, and says so.

The base's fingerprint identifies the weights a LoRA checkpoint belongs to (launch.models.finetune):
sha256 over config.json and, for each weight file, its name, its size, its first and last MiB and
eight 64 KiB samples spread over it. It catches another model, another size or architecture, a
re-saved or fine-tuned copy (every value changes, so every sample does), and any change to a
safetensors header (tensor names, shapes, offsets: the first MiB); it misses an edit confined to
bytes it does not sample. It reads about 2.5 MiB per file, so it costs milliseconds even for 7B.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from torch import nn

from launch.errors import UserError
from launch.models import shards
from launch.models.shards import load_note, peak_reset
from launch.user_code import build_kwargs, call, import_object

MIB = 1 << 20


def weight_files(path: str) -> list[Path]:
    """The checkpoint directory's weight files; one line if it is not one."""
    d = Path(path)
    if not d.is_dir():
        raise UserError(f"model.pretrained={path}: no such directory (a local Hugging Face checkpoint directory: config.json and *.safetensors)")
    if not (d / "config.json").is_file():
        raise UserError(f"model.pretrained={path}: no config.json in it (a Hugging Face checkpoint directory holds config.json and *.safetensors or pytorch_model*.bin)")
    files = sorted(d.glob("*.safetensors")) or sorted(d.glob("pytorch_model*.bin"))
    if not files:
        raise UserError(f"model.pretrained={path}: config.json but no weight files (*.safetensors or pytorch_model*.bin) in it")
    return files


def _samples(path: Path) -> bytes:
    size = path.stat().st_size
    h = hashlib.sha256(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(MIB))
        for i in range(1, 9):
            f.seek(size * i // 9)
            h.update(f.read(64 << 10))
        f.seek(max(0, size - MIB))
        h.update(f.read(MIB))
    return h.digest()


def fingerprint(path: str) -> str:
    """sha256 (hex, 16 characters) of config.json and samples of every weight file (see the module docstring)."""
    h = hashlib.sha256((Path(path) / "config.json").read_bytes())
    for f in weight_files(path):
        h.update(_samples(f))
    return h.hexdigest()[:16]


def model_class(cfg):
    cls = import_object(cfg.model.name, "model.name", cfg.log.debug)
    if not callable(getattr(cls, "from_pretrained", None)):
        raise UserError(f"model.pretrained: model.name '{cfg.model.name}' has no from_pretrained (use a Hugging Face class, e.g. transformers:AutoModelForCausalLM)")
    return cls


def quiet_transformers() -> None:
    """No progress bars or per-rank loading reports on every rank (the start-up says what was loaded)."""
    try:
        from transformers.utils import logging

        logging.disable_progress_bar()
        logging.set_verbosity_error()
    except ImportError:
        pass


def build(cfg, on_meta: bool, say=None) -> nn.Module:
    """The pretrained model: whole (from_pretrained), or on the meta device with a plan to read each
    rank's shards after sharding (launch.models.shards.materialize)."""
    m = cfg.model
    files = weight_files(m.pretrained)
    cls = model_class(cfg)
    kwargs = build_kwargs(m.kwargs, "model.kwargs", cfg.log.debug)
    quiet_transformers()
    if on_meta:
        model, why_not = shards.on_meta(cls, m.pretrained, files, kwargs)
        if model is not None:
            return model
        if say is not None:
            say(f"model.pretrained: every rank loads the whole model once, then shards it ({why_not})")
    before = peak_reset()
    model = call(f"model.name '{m.name}'.from_pretrained('{m.pretrained}')", cls.from_pretrained, m.pretrained, debug=cfg.log.debug, **kwargs)
    if not isinstance(model, nn.Module):
        raise UserError(f"model.name '{m.name}'.from_pretrained returned a {type(model).__name__}, not a torch module")
    if say is not None:
        say(load_note(model, before, "from_pretrained, the whole model on this rank"))
    return model
