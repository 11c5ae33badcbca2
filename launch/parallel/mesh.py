"""Device meshes: HSDP (dist.replicate), tensor parallel (dist.tp) and FSDP x TP, one layout for all.

The ranks form a grid (replicate, shard, tp) with tp innermost: global rank g = (r * S + s) * T + t.
A tensor-parallel group is T consecutive ranks (one node's GPUs under torchrun or srun), an HSDP
replica S x T consecutive ones (a node with dist.replicate=auto), the replicas lie across nodes. The
data-parallel coordinates are (g // T, world // T): the T ranks of a tensor-parallel group are fed the
same samples (launch.data.order deals the global order over the data-parallel ranks), compute the
same loss, and only the data-parallel ranks average gradients.

The layout is a pure function of the settings and the launcher's variables, so every check of it
(T divides the world, R divides the data-parallel size) runs before any process group work. The mesh
itself (torch's DeviceMesh) is built by the strategy (launch.parallel.meshed), after the model's plan
has been checked. Clipping and the data-parallel gradient average live here because both must know
which ranks hold which part of a gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from launch.errors import UserError


@dataclass(frozen=True)
class Layout:
    world: int
    rank: int
    tp: int = 1
    replicate: int = 1
    fsdp: bool = False  # dist.strategy=fsdp: the data-parallel ranks shard (or, with replicate, HSDP)

    @property
    def data_size(self) -> int:
        """Data-parallel ranks: each takes its own share of every global batch."""
        return self.world // self.tp

    @property
    def data_rank(self) -> int:
        return self.rank // self.tp

    @property
    def shard(self) -> int:
        return self.data_size // self.replicate

    @property
    def copy(self) -> bool:
        """A tensor-parallel peer other than its group's first rank: fed the same batches as that
        rank, so its losses, samples and evaluation sums are counted there, not here."""
        return self.rank % self.tp != 0

    @property
    def meshed(self) -> bool:
        return self.tp > 1 or self.replicate > 1

    def dims(self) -> list[tuple[str, int]]:
        """(name, size) of the mesh's dimensions, outermost first; a dimension of size 1 is left out
        (the data dimension always stays: 'shard' under FSDP, 'data' otherwise)."""
        out = [("replicate", self.replicate)] if self.replicate > 1 else []
        out.append(("shard", self.shard) if self.fsdp else ("data", self.data_size))
        return out + ([("tp", self.tp)] if self.tp > 1 else [])

    def data_dims(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.dims() if n != "tp")

    def describe(self) -> str:
        grid = " x ".join(f"{n} {s}" for n, s in self.dims())
        kind = ("HSDP" if self.replicate > 1 else "FSDP") if self.fsdp and self.data_size > 1 else ""
        kind = " x ".join(k for k in (kind, "TP" if self.tp > 1 else "") if k) or "data parallel"
        return f"device mesh ({grid}): {kind}; {self.data_size} data-parallel rank(s) of {self.world}, each global batch split {self.data_size} ways"


def layout(cfg, env) -> Layout:
    """The mesh for these settings and this launcher (no process group needed): one-line errors for
    sizes that do not divide."""
    d, k = cfg.dist, env.world_size
    t = d.tp
    if t > 1 and k % t:
        raise UserError(f"dist.tp={t} does not divide the world size {k}: tensor-parallel groups of {t} ranks need a multiple of {t} processes")
    r = replicas(d.replicate, env, k // t)
    if (k // t) % r:
        of = f"{k} processes" + (f" / dist.tp={t}" if t > 1 else "")
        raise UserError(f"dist.replicate={d.replicate}: {r} replicas do not divide the {k // t} data-parallel ranks ({of}); choose a replica count that divides it")
    return Layout(k, env.rank, t, r, d.strategy == "fsdp")


def replicas(setting: str, env, data_size: int) -> int:
    """dist.replicate as a number: 'auto' is one replica per node (torchrun's and srun's nodes)."""
    if setting != "auto":
        return int(setting)
    return max(1, env.world_size // max(1, env.local_world_size)) if env.world_size > 1 else 1


def notes(lay: Layout, env) -> list[str]:
    """What the run should know about its mesh (said by rank 0)."""
    out = [lay.describe()]
    if lay.tp > 1 and env.local_world_size % lay.tp:
        out.append(f"note: dist.tp={lay.tp} spans nodes ({env.local_world_size} processes per node): every layer's all-reduce crosses the network; keep dist.tp within a node")
    return out


def restream(ckpt: dict, lay: Layout, seed: int) -> None:
    """Random streams belong to data-parallel ranks: the T ranks of a tensor-parallel group draw the
    same dropout masks (their activations between the pairs are copies that must stay equal). Each
    rank got its own saved stream back (launch.checkpoint.state); a checkpoint from another mesh shape
    has none that fit, so under TP (then or now) every rank derives its stream anew from (seed, step,
    data-parallel rank), TP peers alike."""
    from launch.train import randomness

    saved = int(((ckpt.get("config") or {}).get("dist") or {}).get("tp", 1) or 1)
    if (saved > 1 or lay.tp > 1) and (saved != lay.tp or len(ckpt.get("rng_ranks") or []) != lay.world):
        randomness.seed_rank(randomness.mix(seed, ckpt["step"]), lay.data_rank)


def build(lay: Layout, device: torch.device):
    """torch's DeviceMesh over the world, dimensions named as in Layout.dims (collective)."""
    from torch.distributed.device_mesh import init_device_mesh

    names, sizes = zip(*lay.dims())
    return init_device_mesh(device.type, tuple(sizes), mesh_dim_names=tuple(names))


def data_mesh(mesh, lay: Layout):
    """The data-parallel part of the mesh (what FSDP shards over, 2-D for HSDP)."""
    dims = lay.data_dims()
    return mesh[dims if len(dims) > 1 else dims[0]]


# --------------------------------------------------------------------------- gradients


def _local(t: torch.Tensor) -> torch.Tensor:
    return getattr(t, "_local_tensor", t)


def total_norm(grads: list) -> torch.Tensor:
    """The 2-norm of the whole gradient, the same number on every rank, over gradients that live on
    different meshes (tensor-parallel DTensors, plain replicated tensors, FSDP shards): each tensor's
    local norm, squared and summed per (mesh, sharded dimensions), summed over the ranks of those
    dimensions only (a replicated dimension holds copies, counted once), then added up in parameter
    order. torch's clip_grad_norm_ stacks the norms and fails when they live on different meshes."""
    groups: dict = {}
    for g in grads:
        mesh, dims = None, ()
        if hasattr(g, "placements"):
            # sharded along a mesh dimension: Shard, and FSDP x TP's _StridedShard (not a Shard to is_shard())
            mesh, dims = g.device_mesh, tuple(i for i, p in enumerate(g.placements) if not p.is_replicate())
        groups.setdefault((mesh, dims), (mesh, dims, []))[2].append(_local(g))  # equal meshes are one key
    total = None
    for mesh, dims, tensors in groups.values():
        norms = torch._foreach_norm(tensors, 2.0)
        squared = torch.stack([n.float() for n in norms]).pow(2).sum()
        for dim in dims:
            dist.all_reduce(squared, group=mesh.get_group(dim))
        total = squared if total is None else total + squared
    return torch.zeros(()) if total is None else total.sqrt()


def clip_(params: list, max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ (scale by max_norm / (norm + 1e-6) when above max_norm) with the norm
    of total_norm; returns the norm."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = total_norm(grads)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    locals_ = [_local(g) for g in grads]
    torch._foreach_mul_(locals_, coef.to(locals_[0].device))
    return norm


def match_layouts(params: list) -> None:
    """Give each DTensor gradient its parameter's placements (a whole gradient of a split parameter is
    cut to this rank's part; nothing to send)."""
    for p in params:
        g = p.grad
        if g is not None and hasattr(g, "placements") and tuple(g.placements) != tuple(p.placements):
            p.grad = g.redistribute(p.device_mesh, p.placements)


def average_gradients(params: list, group, size: int, bucket_mb: float) -> None:
    """Average the (local) gradients over a data-parallel group: flat buckets of at most bucket_mb
    in parameter order, one all-reduce each (the same layout at every step: a resumed run sums in
    the same order as the uninterrupted one)."""
    grads = [_local(p.grad) for p in params if p.grad is not None]
    limit = max(1, int(bucket_mb * 2**20))
    bucket: list = []
    held = 0
    for g in grads + [None]:
        if bucket and (g is None or g.dtype != bucket[0].dtype or held + g.numel() * g.element_size() > limit):
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat, group=group)
            flat.div_(size)
            at = 0
            for b in bucket:
                b.copy_(flat[at : at + b.numel()].view_as(b))
                at += b.numel()
            bucket, held = [], 0
        if g is not None:
            bucket.append(g)
            held += g.numel() * g.element_size()
