"""dist.tp > 1 or dist.replicate != 1: either strategy on a device mesh (launch.parallel.mesh).

- HSDP (dist.strategy=fsdp, dist.replicate=R): FSDP2 on the 2-D (replicate, shard) mesh: parameters,
  gradients and optimizer state sharded within a replica (S ranks), gradients reduce-scattered there
  and all-reduced across the R replicas. The all-gathers of every block stay inside a replica (a node
  with dist.replicate=auto); only one all-reduce per step crosses the nodes.
- Tensor parallel (dist.tp=T): the model's plan (launch.parallel.tp) splits its layers over T
  consecutive ranks, which see the same samples. With dist.strategy=ddp the data-parallel ranks then
  average gradients after each optimizer step's last backward (flat buckets over the data group).
- FSDP x TP (dist.strategy=fsdp, dist.tp=T): torchtitan's order, TP first, then FSDP over the
  data-parallel part of the mesh (HSDP x TP with dist.replicate too).

Every forward under TP is collective (lockstep evaluation). Clipping takes the global norm over both
meshes (launch.parallel.mesh.total_norm). Checkpoints are sharded (launch.parallel.dcp, DTensors on any
mesh) and reshard to any other mesh or strategy; model.pt is gathered whole, a plain state dict.
"""

from __future__ import annotations

import contextlib
import logging

from torch import nn

from launch.errors import UserError
from launch.parallel import mesh, sync_bn, tp
from launch.parallel.blocks import activation_checkpointing, blocks
from launch.parallel.fsdp import Sharded


class Meshed(Sharded):
    lockstep_forward = True  # a tensor-parallel forward, or FSDP's gathers: every rank keeps pace

    def __init__(self, cfg, rt, say):
        super().__init__(cfg, rt, say)
        self.layout = mesh.layout(cfg, rt.env)
        self.k = self.layout.data_size  # the ranks that average gradients (and the checkpoint's world size)
        self.shards = self.layout.fsdp and self.k > 1  # FSDP over the data-parallel ranks
        self.sharded = True  # DTensor parameters: sharded checkpoints, model.pt gathered
        self.lockstep_forward = True
        self.device_mesh, self.data_group = None, None
        # Gathering FSDP x TP's (_StridedShard, Shard) parameters whole (model.pt) takes two all-gathers, and
        # DTensor warns on every rank that they cannot be merged: gathers sum nothing, the order cannot matter.
        logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)

    def prepare(self, bare: nn.Module, task, sample) -> None:
        lay = self.layout
        plan = tp.plan_for(bare, self.cfg, lay.tp) if lay.tp > 1 else None  # every check before the mesh exists
        if lay.tp > 1 and sync_bn.batchnorm_layers(bare):
            raise UserError(f"dist.tp={lay.tp}: the model has BatchNorm layers, whose statistics tensor parallel does not split; use dist.tp=1")
        for line in mesh.notes(lay, self.rt.env):
            self.say(line)
        self.device_mesh = mesh.build(lay, self.rt.device)
        if plan is not None:
            tp.apply(bare, self.device_mesh["tp"], plan, self.cfg)
            self.say(f"tensor parallel over {lay.tp} ranks: {plan.source}" + (" with sequence parallel" if self.cfg.dist.sequence_parallel else ""))
        if self.shards:
            self.shard_mesh = mesh.data_mesh(self.device_mesh, lay)
            return super().prepare(bare, task, sample)
        if self.k > 1:
            self.data_group = self.device_mesh["data"].get_group()
        self.params = [p for p in bare.parameters() if p.requires_grad]
        if self.cfg.train.activation_checkpointing:
            for b in blocks(bare, self.cfg.dist.fsdp_blocks):
                activation_checkpointing(b)

    def wrap(self, module: nn.Module) -> nn.Module:
        return module  # parallelize_module / fully_shard changed the model in place

    def micro_step(self, module: nn.Module, sync: bool, real: bool):
        if self.shards:
            return super().micro_step(module, sync, real)
        return _after(self._settle) if sync else contextlib.nullcontext()

    def _settle(self) -> None:
        """After the step's last backward: every gradient in its parameter's layout (a split embedding's
        comes back whole from torch's backward: its own rows kept, the rest freed), then the
        data-parallel average."""
        mesh.match_layouts(self.params)
        if self.data_group is not None:
            mesh.average_gradients(self.params, self.data_group, self.k, self.cfg.dist.bucket_cap_mb)

    def clip(self, params: list, max_norm: float) -> None:
        mesh.clip_(params, max_norm)


@contextlib.contextmanager
def _after(fn, *args):
    """Run fn(*args) when the block ends without an error (a collective: never on an error path)."""
    yield
    fn(*args)
