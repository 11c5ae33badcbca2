"""dist.strategy=ddp: every rank holds the whole model; DistributedDataParallel averages gradients.

With one process there is no DDP wrapper at all (a one-rank all-reduce does nothing useful), so a
one-process torchrun job costs what a plain process costs.
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from launch.checkpoint import state as state_mod, store
from launch.errors import UserError
from launch.models.build import clean_state_dict
from launch.parallel import sync_bn
from launch.parallel.blocks import activation_checkpointing, blocks
from launch.train import randomness


class Replicated:
    lockstep_forward = False  # a forward involves no other rank (evaluation may end unevenly)

    def __init__(self, cfg, rt, say):
        self.cfg, self.rt, self.say = cfg, rt, say
        self.k = rt.env.world_size
        self.global_bn = False

    def prepare(self, bare: nn.Module, task, sample) -> None:
        """Before the optimizer exists: BatchNorm statistics over the global micro-batch (dist.sync_batchnorm),
        and unused parameters found now, named, instead of DDP's error at the second step."""
        if self.cfg.train.activation_checkpointing:
            for b in blocks(bare, self.cfg.dist.fsdp_blocks):
                activation_checkpointing(b)
        if self.k == 1:
            return
        self.sample = sample  # for settle_buckets
        self.batch_statistics(bare)
        if not self.cfg.dist.find_unused_parameters:
            unused = unused_parameters(bare, task, *sample)
            if unused:
                shown = ", ".join(unused[:3]) + (f" and {len(unused) - 3} more" if len(unused) > 3 else "")
                raise UserError(
                    f"{len(unused)} parameter(s) get no gradient from the loss ({shown}), which DDP cannot reduce: "
                    "set dist.find_unused_parameters=true (slower), or freeze them (requires_grad=False)"
                )

    def batch_statistics(self, bare: nn.Module) -> None:
        """dist.sync_batchnorm: BatchNorm over the global micro-batch, or a note that the updates differ."""
        layers = len(sync_bn.batchnorm_layers(bare))
        if layers and self.cfg.dist.sync_batchnorm == "false":
            self.say(sync_bn.note_without_sync(layers))
        elif layers:
            sync_bn.convert(bare)
            self.global_bn = True

    def wrap(self, module: nn.Module) -> nn.Module:
        if self.k == 1:
            return module
        d = self.cfg.dist
        # Global statistics keep the buffers equal already: no broadcast before every forward.
        # (torch 2.13 renamed the switch; older versions know only broadcast_buffers.)
        sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters else "broadcast_buffers"
        ddp = nn.parallel.DistributedDataParallel(
            module,
            device_ids=[self.rt.device.index] if self.rt.device.type == "cuda" else None,
            bucket_cap_mb=d.bucket_cap_mb,
            gradient_as_bucket_view=d.gradient_as_bucket_view,
            static_graph=d.static_graph,
            find_unused_parameters=d.find_unused_parameters,
            **{sync: not self.global_bn},
        )
        if not d.find_unused_parameters:  # with it, DDP keeps its first layout for good
            settle_buckets(ddp, *self.sample)
        return ddp

    def micro_step(self, module: nn.Module, sync: bool, real: bool):
        """The context of one micro-batch's forward and backward: DDP syncs gradients only when `sync`
        (the optimizer step's last micro-batch); a stand-in batch (`real` False) adds no statistics."""
        stack = contextlib.ExitStack()
        if not sync and self.k > 1:
            stack.enter_context(module.no_sync())
        if not real and self.global_bn:
            stack.enter_context(sync_bn.stand_in(True))
        return stack

    def clip(self, params: list, max_norm: float) -> None:
        nn.utils.clip_grad_norm_(params, max_norm)

    # ---------------------------------------------------------------- checkpoints

    def write_checkpoint(self, t, at, cfg, data_state: dict, rngs, stall, final: bool = True) -> None:
        """A full checkpoint, one file, written by rank 0 (launch.checkpoint.store)."""
        if self.rt.env.is_main:
            path = store.save(state_mod.capture(t, at, cfg, self.k, data_state, rngs), cfg.run_dir, at.step, cfg.ckpt.keep_last, stall)
            self.say(f"saved {path}")

    def load_state(self, t, ckpt: dict, origin: Path, rt) -> None:
        """Model and optimizer from a full checkpoint, or from a sharded one (read whole, any world size)."""
        if Path(origin).is_dir():
            from launch.parallel import dcp

            dcp.load(t.model, t.optimizer, origin, ckpt, rt, t.ema)
        else:
            state_mod.load_full(ckpt, origin, t)

    def verify_dir(self, path: Path) -> None:
        """Collective check of a sharded checkpoint's files (launch.parallel.dcp)."""
        from launch.parallel import dcp

        dcp.verify(path, self.rt)

    def full_weights(self, bare: nn.Module) -> dict:
        """The whole model as a plain, prefix-free state dict (rank 0 writes it as model.pt)."""
        return clean_state_dict(bare.state_dict())

    @torch.no_grad()
    def before_eval(self, bare: nn.Module) -> None:
        """Every rank takes rank 0's buffers (BatchNorm running statistics), the ones a checkpoint saves,
        so the logged evaluation is the evaluation of the saved model."""
        if self.k == 1:
            return
        for buf in bare.buffers():
            dist.broadcast(buf, src=0)


def settle_buckets(ddp: nn.parallel.DistributedDataParallel, inputs, target) -> None:
    """Give DDP its lasting gradient-bucket layout before the first real step.

    DDP all-reduces its first backward as one bucket in parameter order, then rebuilds the buckets
    once, in the order a backward produced the gradients (after the first iteration; under
    dist.static_graph after the second). gloo sums an element in an order that depends on where it
    lies in the bucket, and from three ranks on (a + b) + c is not a + (b + c): a resumed run, whose
    first steps ran with the first layout while the uninterrupted run had long switched, was an ulp
    off after them (6e-8 at 3 ranks; 2 ranks only add two numbers). So every run, fresh or resumed,
    makes zero-weight synchronised backwards here until a forward has rebuilt the buckets (eval mode:
    no dropout draw, no statistics update; the random streams are put back in case the model draws
    anyway), and all its real steps use the one rebuilt layout."""
    module, saved = ddp.module, randomness.state()
    was = module.training
    module.eval()
    try:
        for _ in range(3):
            loss, _ = ddp(inputs, target)  # the forward rebuilds the buckets once a backward has ordered them
            (loss.float().sum() * 0.0).backward()  # every forward gets its backward: the reducer ends each iteration
            if getattr(ddp, "_has_rebuilt_buckets", False):
                break
    finally:
        module.train(was)
        for p in module.parameters():
            p.grad = None
        randomness.set_state(saved)


def unused_parameters(bare: nn.Module, task, inputs, target) -> list[str]:
    """Parameters that get no gradient on a sample batch (eval mode: no dropout draw, no statistics update)."""
    was = bare.training
    bare.eval()
    try:
        with torch.enable_grad():
            loss, _ = task.train_loss(bare, inputs, target)
            loss.float().sum().backward()
        return [n for n, p in bare.named_parameters() if p.requires_grad and p.grad is None]
    finally:
        for p in bare.parameters():
            p.grad = None
        bare.train(was)
