"""A pretrained model built on the meta device, then each rank's shards read from the safetensors files.

`on_meta` builds the model's skeleton without memory (`torch.device("meta")`, the class's from_config in
the dtype from_pretrained would use) and plans, for every parameter and persistent buffer, where its
bytes are: file, offset, dtype and shape, read from the files' headers. The strategy shards the
skeleton (fully_shard), then `materialize` gives every tensor this rank's storage (`to_empty`) and
reads into it exactly the rows this rank keeps: one seek and one read per tensor, straight into the
shard's memory when the dtypes agree. Nothing is memory-mapped and no tensor is ever whole on a rank
(the ones FSDP does not shard, buffers and 0-d tensors, are small). Non-persistent buffers (rotary
frequencies) are computed again by the model's own `_init_weights`, as from_pretrained does.

The safetensors format is an 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets: [begin, end]}} and the tensors' bytes, row-major, after it.
"""

from __future__ import annotations

import json
from itertools import chain
from pathlib import Path

import torch
from torch import nn

from launch.errors import UserError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
          "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
ATTR = "_launch_shards"  # the plan, on the model until materialize takes it
MIB = 1 << 20


def read_header(path: Path) -> dict:
    """{name: (path, dtype, shape, absolute byte offset)} of one safetensors file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 2 <= n <= 256 << 20:
            raise UserError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise UserError(f"{path}: not a safetensors file (its header is not JSON)") from None
    header.pop("__metadata__", None)
    return {k: (path, v["dtype"], tuple(v["shape"]), 8 + n + v["data_offsets"][0]) for k, v in header.items()}


def _dtype(cls, config, kwargs: dict):
    """The dtype from_pretrained would load in: model.kwargs' dtype, else the checkpoint's ('auto')."""
    want = kwargs.get("dtype", kwargs.get("torch_dtype", "auto"))
    if want == "auto":
        want = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, want) if isinstance(want, str) else want


def on_meta(cls, path: str, files: list[Path], kwargs: dict):
    """(the model on the meta device with its load plan, "") or (None, why it cannot be loaded that way)."""
    if any(f.suffix != ".safetensors" for f in files):
        return None, "its weights are not safetensors files"
    extra = sorted(set(kwargs) - {"dtype", "torch_dtype", "attn_implementation"})
    if extra:
        return None, f"model.kwargs {', '.join(extra)} are from_pretrained's to interpret"
    make = getattr(cls, "from_config", None) or getattr(cls, "_from_config", None)
    if make is None:
        return None, f"{cls.__name__} has no from_config"
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = make(config, dtype=_dtype(cls, config, kwargs), **({"attn_implementation": kwargs["attn_implementation"]} if "attn_implementation" in kwargs else {}))
    index = {}
    for f in files:
        index.update(read_header(f))
    plan, problem = _plan(model, index)
    if problem:
        return None, problem
    setattr(model, ATTR, (plan, getattr(model, "_init_weights", None)))
    return model, ""


def _plan(model: nn.Module, index: dict):
    """[(aliases [(module, attribute)], entry)] for every parameter and persistent buffer, or a reason."""
    by_tensor: dict[int, list] = {}
    names: dict[int, list] = {}
    for mod_name, mod in model.named_modules():
        persistent = [(n, b) for n, b in mod.named_buffers(recurse=False) if n not in mod._non_persistent_buffers_set]
        for attr, t in chain(mod.named_parameters(recurse=False), persistent):
            by_tensor.setdefault(id(t), []).append((mod, attr))
            names.setdefault(id(t), []).append((f"{mod_name}.{attr}" if mod_name else attr, t))
    plan = []
    for key, aliases in by_tensor.items():
        found = [(n, index[n]) for n, _ in names[key] if n in index]
        name, t = names[key][0]
        if not found:
            return None, f"{name} is not in its safetensors files under that name"
        entry = found[0][1]
        if entry[2] != tuple(t.shape) or entry[1] not in DTYPES:
            return None, f"{found[0][0]} is {entry[1]} {list(entry[2])} in the files but {list(t.shape)} in the model"
        plan.append((aliases, entry))
    return plan, ""


def pending(model: nn.Module) -> bool:
    return ATTR in model.__dict__ or any(ATTR in m.__dict__ for m in model.modules())


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device) -> str:
    """After sharding: this rank's storage, its rows read from the files; returns the start-up line."""
    owner = next(m for m in model.modules() if ATTR in m.__dict__)
    plan, init_weights = owner.__dict__.pop(ATTR)
    before = peak_reset()
    model.to_empty(device=device)
    if init_weights is not None:  # non-persistent buffers (rotary frequencies): computed, not stored
        for m in model.modules():
            if m._non_persistent_buffers_set:
                init_weights(m)
    handles: dict = {}
    try:
        for aliases, entry in plan:
            first = getattr(*aliases[0])
            for mod, attr in aliases[1:]:  # tied weights stay one tensor
                if getattr(mod, attr) is not first:
                    setattr(mod, attr, first)
            _read_into(first, entry, handles)
    finally:
        for f in handles.values():
            f.close()
    return load_note(model, before, "meta-device build, each rank read its own shards")


def _read_into(t: torch.Tensor, entry, handles: dict) -> None:
    path, dtype_name, shape, start = entry
    src = DTYPES[dtype_name]
    local = getattr(t, "_local_tensor", t.data)
    first_row, rows = 0, (shape[0] if shape else 1)
    if local is not t.data:  # a shard: FSDP keeps rows [offset, offset + n) of dim 0
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local_shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        if any(o for o in offset[1:]) or tuple(local_shape[1:]) != tuple(shape[1:]):
            raise UserError(f"model.pretrained: a shard of {list(shape)} that is not a block of rows ({list(local_shape)} at {list(offset)})")
        first_row, rows = offset[0], local_shape[0]
    if local.numel() == 0:
        return
    row_bytes = (local.numel() // max(rows, 1)) * src.itemsize
    f = handles.get(path) or handles.setdefault(path, open(path, "rb"))
    f.seek(start + first_row * row_bytes)
    direct = local.dtype == src and local.device.type == "cpu" and local.is_contiguous()
    buf = local if direct else torch.empty(local.shape, dtype=src)
    view = buf.reshape(-1).view(torch.uint8).numpy()
    if f.readinto(memoryview(view)) != view.nbytes:
        raise UserError(f"model.pretrained: {path} is shorter than its header says (truncated?)")
    if not direct:
        local.copy_(buf)


def peak_reset():
    """This process's resident memory now, with the peak reset (Linux), or None: the load's own peak is measured."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM, the peak resident set size
        return _status("VmRSS")
    except OSError:
        return None


def _status(key: str):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def load_note(model: nn.Module, before, how: str) -> str:
    """One line: the parameter bytes this rank holds, of the model's, and how much resident memory the
    load added at its peak, with every page of the parameters read (from_pretrained maps safetensors
    files and reads a page only when it is used)."""
    mine = total = 0
    for p in {id(p): p for p in model.parameters()}.values():
        local = getattr(p, "_local_tensor", p).detach()
        mine += local.numel() * local.element_size()
        total += p.numel() * p.element_size()
        if local.numel() and local.device.type == "cpu" and local.is_contiguous():  # a byte of every page: weights that
            local.reshape(-1).view(torch.uint8)[::4096].sum()  # from_pretrained maps from the file count once they are read
    peak = _status("VmHWM") if before is not None else None
    grew = f"; peak memory during the load +{(peak - before) / MIB:.1f} MB" if peak is not None else ""
    return f"model.pretrained: {how}: this rank holds {mine / MIB:.1f} MB of the model's {total / MIB:.1f} MB of parameters{grew}"

