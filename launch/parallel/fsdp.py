"""dist.strategy=fsdp: parameters, gradients and optimizer state sharded over the ranks (torch's FSDP2).

Each block (dist.fsdp_blocks names their classes; by default the children of the model's
nn.ModuleLists, else its top-level children that hold parameters) gets `fully_shard`, then the root:
a rank keeps 1/k of every parameter and gathers a block's parameters just before its forward (and
backward), so the memory for parameters + gradients + optimizer state is about 1/k of DDP's plus one
block. The math is DDP's: gradients are averaged over the ranks (reduce-scatter instead of
all-reduce), so with the launcher's loss weighting k ranks compute one process's update (fp32).

Everything else the loop does keeps its meaning: accumulation (`set_requires_gradient_sync`, FSDP has
no `no_sync`), clipping by the global norm over all shards, AMP, BatchNorm statistics over the global
micro-batch (as under DDP), and evaluation, which runs a stand-in batch on a rank that has run out of
samples, since every forward gathers parameters from every rank. Checkpoints are sharded
(launch.parallel.dcp); the final model.pt is gathered once, a plain state dict.

With one process there is nothing to shard: the run is a plain process (and says so).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from launch.checkpoint import state as state_mod, store
from launch.errors import UserError
from launch.models.build import clean_state_dict
from launch.models import lora, shards
from launch.parallel.blocks import activation_checkpointing, blocks, describe, trainable_groups
from launch.parallel.ddp import Replicated


class Sharded(Replicated):
    lockstep_forward = True  # every forward gathers parameters from every rank: evaluation must keep pace
    shard_mesh = None  # the DeviceMesh to shard over (launch.parallel.meshed: HSDP's 2-D mesh, FSDP x TP's data part); None: every rank

    def __init__(self, cfg, rt, say):
        super().__init__(cfg, rt, say)
        self.sharded = self.k > 1
        if not self.sharded:
            self.lockstep_forward = False
            say("dist.strategy=fsdp with one process: nothing to shard, training as a plain process")
        self.pending, self.async_group = None, None
        if cfg.ckpt.async_save and self.sharded:  # DCP's background writes on the training group abort it (gloo): a group of their own
            import datetime

            import torch.distributed as dist

            self.async_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=cfg.ckpt.barrier_timeout_s))
        if cfg.dist.cpu_offload and rt.device.type != "cuda":
            raise UserError(f"dist.cpu_offload=true needs a CUDA device (on {rt.device.type} the parameters already live in host memory)")

    def prepare(self, bare: nn.Module, task, sample) -> None:
        if not self.sharded:
            return super().prepare(bare, task, sample)
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        if not any(p.requires_grad for p in bare.parameters()):
            raise UserError("dist.strategy=fsdp: the model has no trainable parameters to shard")
        self.batch_statistics(bare)
        d = self.cfg.dist
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        options = {
            "reshard_after_forward": d.reshard_after_forward,
            "mp_policy": MixedPrecisionPolicy(param_dtype=dtypes[d.param_dtype], reduce_dtype=dtypes[d.reduce_dtype]),
        }
        if d.cpu_offload:
            options["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
        if self.shard_mesh is not None:
            options["mesh"] = self.shard_mesh
        # The loop never modifies a model's output in place (losses are out of place): FSDP's warning
        # about outputs that are views cannot apply, and would print on every rank.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        units, sharded, adapters = blocks(bare, d.fsdp_blocks), set(), 0
        named = describe(bare, units)  # before fully_shard renames their classes
        for b in units:
            if self.cfg.train.activation_checkpointing:
                activation_checkpointing(b)
            adapters += self._shard_trainable_apart(b, sharded, fully_shard, options)
            fully_shard(b, **options)
            sharded.add(id(b))
        adapters += self._shard_trainable_apart(bare, sharded, fully_shard, options)
        fully_shard(bare, **options)
        self.root = bare
        apart = f"; in {adapters} of them frozen and trainable parameters mix (LoRA), so their trainable modules are a unit of their own" if adapters else ""
        self.say(f"dist.strategy=fsdp: sharded {named or 'no blocks'}, then the root{apart}")
        if shards.pending(bare):  # built on the meta device: storage for this rank's shards only, read from the files
            self.say(shards.materialize(bare, self.rt.device))
            lora.init_adapters(bare, self.cfg.train.seed)

    @staticmethod
    def _shard_trainable_apart(block: nn.Module, sharded: set, fully_shard, options) -> int:
        """A unit with frozen and trainable parameters: the trainable modules first, as one unit of their own."""
        group = trainable_groups(block, sharded)
        if group:
            fully_shard(group, **options)
            sharded.update(id(m) for m in group)
        return int(bool(group))

    def wrap(self, module: nn.Module) -> nn.Module:
        return module  # fully_shard changed the model in place; there is no wrapper

    def micro_step(self, module: nn.Module, sync: bool, real: bool):
        if self.sharded:
            self.root.set_requires_gradient_sync(sync)  # accumulate unsharded, reduce-scatter on the last
        return super().micro_step(module, True, real)

    def clip(self, params: list, max_norm: float) -> None:
        """The global norm over every rank's shards (a DTensor norm, made whole once), then the scale."""
        grads = [p.grad for p in params if p.grad is not None]
        total = nn.utils.get_total_norm(grads)
        if hasattr(total, "full_tensor"):
            total = total.full_tensor()
        nn.utils.clip_grads_with_norm_(params, max_norm, total)

    def write_checkpoint(self, t, at, cfg, data_state: dict, rngs, stall, final: bool = True) -> None:
        """Sharded: every rank writes its own shards, nothing is gathered (launch.parallel.dcp). With
        ckpt.async_save a periodic save writes in the background and is committed at the next save;
        a save the run ends or stops on is written at once."""
        if not self.sharded:
            return super().write_checkpoint(t, at, cfg, data_state, rngs, stall, final)
        from launch.parallel import dcp

        self.flush()
        background = cfg.ckpt.async_save and not final
        rest = state_mod.capture(t, at, cfg, self.k, data_state, rngs, tensors=False)
        finish = dcp.save(t.model, t.optimizer, rest, cfg.run_dir, at.step, self.rt, stall, self.async_group if background else None, t.ema)
        self.pending = lambda: self._commit(finish, cfg.ckpt.keep_last, cfg.run_dir)
        if not background:
            self.flush()

    def flush(self) -> None:
        """Commit the checkpoint still being written in the background, if any (collective)."""
        pending, self.pending = getattr(self, "pending", None), None
        if pending is not None:
            pending()

    def _commit(self, finish, keep_last: int, run_dir) -> None:
        previous = store.read_latest(store.checkpoint_dir(run_dir))
        path = finish()
        if self.rt.env.is_main:
            store.commit(path, keep_last, previous)
            self.say(f"saved {path}")

    def load_state(self, t, ckpt: dict, origin, rt) -> None:
        """Shards resharded to this world size, or a full checkpoint (from DDP or one process) cut into shards."""
        if not self.sharded or origin.is_dir():
            return super().load_state(t, ckpt, origin, rt)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        # set_*_state_dict rewrite the dicts they are given and would share the step counters with
        # them: copies, or a second import from the same dict drifts.
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(t.model, copy.deepcopy(clean_state_dict(ckpt["model"])), options=full)
        osd = copy.deepcopy(ckpt["optimizer"])
        if not osd["state"]:  # a stateless optimizer (SGD without momentum): only its settings to take
            for group, saved in zip(t.optimizer.param_groups, osd["param_groups"]):
                group.update({k: v for k, v in saved.items() if k != "params"})
        else:  # the file's optimizer indexes its parameters in order, as this optimizer holds them
            name_of = {id(p): n for n, p in t.model.named_parameters()}
            names = [name_of[id(p)] for g in t.optimizer.param_groups for p in g["params"]]
            by_name = {"state": {names[i]: v for i, v in osd["state"].items()},
                       "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]]}
            set_optimizer_state_dict(t.model, t.optimizer, by_name, options=full)
        if t.ema is not None and ckpt.get("ema") is not None:  # a whole EMA cut into this rank's shards
            from torch.distributed.tensor import distribute_tensor

            whole = clean_state_dict(ckpt["ema"])
            t.ema.load({n: distribute_tensor(whole[n], p.device_mesh, p.placements) for n, p in t.ema.named}, ckpt["ema_updates"])

    def full_weights(self, bare: nn.Module) -> dict:
        """Collective: the whole model as a plain state dict on rank 0 (empty elsewhere)."""
        if not self.sharded:
            return super().full_weights(bare)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(bare, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
