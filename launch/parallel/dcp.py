"""Sharded checkpoints (dist.strategy=fsdp): torch's Distributed Checkpoint (DCP), under the launcher's rules.

Layout: `checkpoints/step_XXXXXXXX.dcp/` holds DCP's files (`__<rank>_<n>.distcp` per rank and
`.metadata`) with the model's and the optimizer's tensors, each rank writing its own shards (nothing is
gathered), and `state.pt`, the rest of the checkpoint (torch.save by rank 0: position, schedule, every
rank's RNG, config, the optimizer's param_groups). The manifest beside it lists every file with its
size and sha256, and `latest` names the directory: a checkpoint counts only once all of that exists.

Writing: all ranks write into `.step_XXXXXXXX.dcp.tmp/` (collective), rank 0 adds state.pt, each rank
hashes its share of the files, rank 0 writes the manifest, renames the directory into place and moves
`latest`. A kill at any instant leaves no directory under a final name without its manifest.

Reading keeps the project's promise that no load runs pickled code: DCP reads its `.metadata` with
pickle.load and would torch.load any non-tensor item with weights_only=False. Here `.metadata` goes
through an unpickler that builds DCP's own metadata classes and nothing else, and a byte item is refused:
these checkpoints hold tensors only. Files are verified first (sizes everywhere, sha256 shared out over
the ranks, one verdict for all). Loading reshards: any world size reads any checkpoint (FSDP at
another world size, DDP or one process), continuing at the exact sample.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from launch.checkpoint import integrity
from launch.checkpoint.integrity import WriteError
from launch.checkpoint.store import FORMAT, SHARDED_STATE as STATE, CheckpointError, checkpoint_dir, make_checkpoint_dir, manifest_path
from launch.processes.dist import Runtime, gather_to_main, save_barrier

SUFFIX = ".dcp"
_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", n)
    for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
              "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
     ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}


def step_dir(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:08d}{SUFFIX}"


class _MetadataOnly(pickle.Unpickler):
    """DCP's metadata classes, torch dtypes and sizes: nothing that can run code."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")


def read_metadata(path: Path):
    try:
        with open(Path(path) / ".metadata", "rb") as f:
            return _MetadataOnly(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"checkpoint {path}: refused: its .metadata holds a pickled Python object ({str(e).replace('GLOBAL ', '')}), not DCP's metadata; it was not executed") from None
    except (OSError, EOFError, ValueError, AttributeError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable .metadata ({integrity.cause(e)})") from None


def _reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            md = read_metadata(self.path)
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeReader(str(path))


def _planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class TensorsOnly(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            raise CheckpointError(f"checkpoint item {read_item.dest_index.fqn}: refused: a pickled object where only tensors belong (it would be loaded with weights_only=False)")

    return TensorsOnly()


def _refused(e: BaseException):
    """Our own refusal inside DCP's CheckpointException (its failures: {rank: (exception, traceback)})."""
    found = [*getattr(e, "args", ()), *getattr(e, "failures", {}).values()]
    found = [f[0] if isinstance(f, tuple) and f else f for f in found]
    return next((f for f in found if isinstance(f, CheckpointError)), None)


def _first_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:240] or type(e).__name__


# --------------------------------------------------------------------------- templates


def tensors_of(model, optimizer, ema=None) -> tuple[dict, list]:
    """({'model': ..., 'optim': ..., 'ema': ...} of tensors (DTensor shards under FSDP), the optimizer's
    param_groups). The optimizer's state is keyed by parameter name, so any world size and strategy can read it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer)
    return {"model": get_model_state_dict(model), "optim": osd["state"], **({"ema": ema.state()} if ema is not None else {})}, osd["param_groups"]


def put(model, optimizer, tensors: dict, groups: list) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, tensors["model"])
    set_optimizer_state_dict(model, optimizer, {"state": tensors["optim"], "param_groups": groups})


# --------------------------------------------------------------------------- write


def save(model, optimizer, rest: dict, run_dir: Path, step: int, rt: Runtime, before_rename=None, async_group=None, ema=None):
    """Collective. Every rank writes its shards; returns `finish()`, which (collectively) waits for the
    writes, shares out the hashing and has rank 0 write the manifest and rename the directory into
    place, returning it. With `async_group` the writes run in the background on that group (training
    waits only for the copy of its shards): call finish() later, before the next save."""
    from torch.distributed.checkpoint import FileSystemWriter, async_save, save as dcp_save

    final = step_dir(run_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if rt.env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        make_checkpoint_dir(run_dir)
        tmp.mkdir()
    save_barrier(rt)
    tensors, groups = tensors_of(model, optimizer, ema)
    if ema is not None:  # the background writer copies them: detached clones, not the live shadows
        tensors["ema"] = {n: t.detach().clone() for n, t in tensors["ema"].items()}
    pending = None
    try:
        if async_group is None:
            dcp_save(tensors, storage_writer=FileSystemWriter(str(tmp), thread_count=1))
        else:
            pending = async_save(tensors, storage_writer=FileSystemWriter(str(tmp), thread_count=1), process_group=async_group, async_stager=_stager())
    except BaseException as e:  # CheckpointException derives from BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise WriteError(f"cannot write sharded checkpoint {final}: {_first_line(e)}") from None
    if rt.env.is_main:
        integrity.atomic_write(tmp / STATE, lambda f: torch.save({"format": FORMAT, **rest, "optimizer": {"param_groups": groups}}, f), what="checkpoint")

    def finish() -> Path:
        if pending is not None:
            try:
                getattr(pending, "upload_completion", pending).result()
            except BaseException as e:
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
                raise WriteError(f"cannot write sharded checkpoint {final} (in the background): {_first_line(e)}") from None
        _commit(tmp, final, step, rt, before_rename)
        return final

    return finish


def _stager():
    """Staging copies of the shards, without pinned or shared memory (those need an accelerator)."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=False, use_non_blocking_copy=False))


def _commit(tmp: Path, final: Path, step: int, rt: Runtime, before_rename) -> None:
    """Every rank hashes its share of the files; rank 0 writes the manifest and renames the directory."""
    save_barrier(rt)
    names = sorted(p.name for p in tmp.iterdir() if not p.name.startswith(".tmp")) if tmp.exists() else []
    mine = {n: {"bytes": (tmp / n).stat().st_size, "sha256": integrity.sha256_file(tmp / n)} for n in names[rt.env.rank :: rt.env.world_size]}
    shares = gather_to_main(mine, rt)
    if rt.env.is_main:
        files = {f"{final.name}/{n}": rec for share in shares for n, rec in share.items()}
        integrity.write_manifest(manifest_path(final), files, checkpoint=final.name, step=step)
        if before_rename is not None:
            before_rename()  # test hook: a kill here leaves the previous checkpoint committed
        shutil.rmtree(final, ignore_errors=True)  # a leftover of a killed run that never got committed
        os.replace(tmp, final)
        integrity.fsync_dir(final.parent)


# --------------------------------------------------------------------------- read


def verify(path: Path, rt: Runtime) -> None:
    """Collective: every file of the manifest there with its recorded size, the sha256 reading shared
    out over the ranks, one verdict for all (CheckpointError naming the first bad file)."""
    rank, k = (rt.env.rank, rt.env.world_size) if dist.is_initialized() else (0, 1)
    problem = None
    try:
        if not integrity.verify(path, (rank, k)):
            problem = f"checkpoint {path}: no manifest (a sharded checkpoint that was never committed)"
    except integrity.IntegrityError as e:
        problem = f"checkpoint {e}"
    if k > 1:
        found = [None] * k
        dist.all_gather_object(found, problem, group=rt.save_group)
        problem = next((p for p in found if p), None)
    if problem:
        raise CheckpointError(problem)


def _optim_templates(model, md) -> dict:
    """Tensors to load the optimizer's state into, shaped by the checkpoint's metadata: a fresh
    optimizer has no state yet (momentum buffers appear at the first step). A moment of a parameter
    takes the parameter's layout (sharded like it under FSDP); a counter is a plain tensor."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    params = dict(model.named_parameters())
    out: dict = {}
    for key, meta in md.state_dict_metadata.items():
        if not key.startswith("optim.") or not isinstance(meta, TensorStorageMetadata):
            continue
        fqn, _, name = key[len("optim."):].rpartition(".")
        p = params.get(fqn)
        same = p is not None and tuple(meta.size) == tuple(p.shape)
        out.setdefault(fqn, {})[name] = torch.zeros_like(p, dtype=meta.properties.dtype) if same else torch.zeros(meta.size, dtype=meta.properties.dtype)
    return out


def load(model, optimizer, path: Path, rest: dict, rt: Runtime, ema=None) -> None:
    """Fill the model, optimizer (and EMA) from the shards, resharded to this world size and strategy."""
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    md = read_metadata(path)
    tensors = {"model": get_model_state_dict(model), "optim": _optim_templates(model, md)}
    has_ema = ema is not None and any(k.startswith("ema.") for k in md.state_dict_metadata)
    if has_ema:
        tensors["ema"] = {n: torch.zeros_like(t) for n, t in ema.state().items()}
    try:
        with warnings.catch_warnings():  # one process reading a sharded checkpoint: "assuming ... a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp_load(tensors, storage_reader=_reader(path), planner=_planner(), no_dist=not dist.is_initialized())
    except CheckpointError:
        raise
    except BaseException as e:  # CheckpointException derives from BaseException (a missing key, a size mismatch)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise _refused(e) or CheckpointError(f"checkpoint {path}: does not fit this model ({_first_line(e)})") from None
    put(model, optimizer, tensors, rest["optimizer"]["param_groups"])
    if has_ema:
        ema.load(tensors["ema"], rest["ema_updates"])


def export(path: Path) -> dict:
    """The model's tensors of a sharded checkpoint as one plain state dict, in this process alone
    (`launch export`, `launch predict`): shapes and dtypes come from the metadata, no model needed."""
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = read_metadata(path)
    full = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()
            if k.startswith("model.") and isinstance(v, TensorStorageMetadata)}
    nested = {"model": {k[len("model."):]: t for k, t in full.items()}}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp_load(nested, storage_reader=_reader(path), planner=_planner(), no_dist=True)
    except CheckpointError:
        raise
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise _refused(e) or CheckpointError(f"checkpoint {path}: unreadable shards ({_first_line(e)})") from None
    return nested["model"]
