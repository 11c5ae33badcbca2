"""What a checkpoint holds, taking it from a run and putting it back, and which one to resume from.

The file format (launch.checkpoint.store) is unchanged since the first version: a checkpoint written
before the loop was split into modules resumes after it (tests/fixtures/pre_split_run).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from launch.checkpoint import store
from launch.models import finetune
from launch.models.build import clean_state_dict
from launch.processes.dist import Runtime, all_reduce_sum, gather_to_main, save_barrier
from launch.train import randomness


@dataclass
class TrainState:
    """Where training stands: everything besides tensors that a resume needs."""

    epoch: int = 0
    step: int = 0  # optimizer steps done in total
    samples_in_epoch: int = 0  # global samples consumed in `epoch` (the resume point inside it)
    epoch_loss_sum: float = 0.0  # global train-loss sum so far in `epoch` (carried by rank 0 on resume)
    epoch_loss_count: float = 0  # elements in that sum
    stream_state: Optional[dict] = None  # a stateful stream's own state at samples_in_epoch (launch.data.stream)


@dataclass
class Trainables:
    """The objects whose state a checkpoint captures besides the TrainState."""

    model: nn.Module  # the bare user model
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: Optional[object]
    ema: Optional[object] = None  # launch.train.ema.EMA when train.ema_decay > 0


def optimizer_state(optimizer) -> dict:
    """The optimizer's state_dict with plain-float learning rates (a CUDA-graph run keeps them as
    device tensors), so any run can resume it."""
    sd = optimizer.state_dict()
    for group in sd["param_groups"]:
        if isinstance(group.get("lr"), torch.Tensor):
            group["lr"] = float(group["lr"])
    return sd


def capture(t: Trainables, s: TrainState, cfg, world_size: int, data_state: dict, rngs: Optional[list] = None, tensors: bool = True) -> dict:
    """The checkpoint's contents; without `tensors` (a sharded checkpoint: the shards hold them) no
    model and no optimizer state."""
    return {
        **({"model": clean_state_dict(t.model.state_dict()), "optimizer": optimizer_state(t.optimizer)} if tensors else {}),
        **({"ema": clean_state_dict(t.ema.state())} if tensors and t.ema is not None else {}),
        "ema_updates": t.ema.updates if t.ema is not None else None,
        "scheduler": t.scheduler.state_dict(),
        "scaler": t.scaler.state_dict() if t.scaler is not None else None,
        "epoch": s.epoch,
        "step": s.step,
        "samples_in_epoch": s.samples_in_epoch,
        "epoch_loss_sum": s.epoch_loss_sum,
        "epoch_loss_count": s.epoch_loss_count,
        "world_size": world_size,
        "batch_size": cfg.data.batch_size,
        "rng": randomness.state(),  # rank 0's (what checkpoints before per-rank streams held)
        "rng_ranks": rngs or [randomness.state()],  # every rank's stream, restored to that rank
        "stream_state": s.stream_state,
        "config": cfg.to_dict(),
        "data_state": data_state,
        "torch_version": str(torch.__version__),
        "base": base.record() if (base := finetune.base_of(t.model)) is not None else None,  # the weights it was fine-tuned from
    }


def load_full(ckpt: dict, origin: Path, t: Trainables) -> None:
    """Model and optimizer from a full checkpoint (one file, every tensor in it)."""
    try:
        t.model.load_state_dict(clean_state_dict(ckpt["model"]))
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise store.CheckpointError(f"checkpoint {origin}: does not fit this model ({detail[:300]})") from None
    t.optimizer.load_state_dict(ckpt["optimizer"])
    if t.ema is not None and ckpt.get("ema") is not None:
        t.ema.load(clean_state_dict(ckpt["ema"]), ckpt["ema_updates"])


def restore(ckpt: dict, origin: Path, t: Trainables, rank: int, world_size: int, seed: int, strategy, rt) -> TrainState:
    """Everything a checkpoint holds back into the run: the tensors through the strategy (which
    knows whether they are whole or sharded, here or in the file), the rest here. A checkpoint that
    holds only what trained (LoRA) resumes only onto the base it was trained from."""
    finetune.check_base(ckpt, t.model, origin)
    strategy.load_state(t, ckpt, origin, rt)
    if ckpt.get("scheduler") is not None:
        t.scheduler.load_state_dict(ckpt["scheduler"])
    if t.scaler is not None and ckpt.get("scaler"):
        t.scaler.load_state_dict(ckpt["scaler"])
    restore_rng(ckpt, rank, world_size, seed)
    s = TrainState(ckpt["epoch"], ckpt["step"], ckpt["samples_in_epoch"], stream_state=ckpt.get("stream_state"))
    if rank == 0:  # the saved partial-epoch loss is a global sum: rank 0 alone carries it forward
        s.epoch_loss_sum, s.epoch_loss_count = ckpt["epoch_loss_sum"], ckpt["epoch_loss_count"]
    return s


def restore_rng(ckpt: dict, rank: int, world_size: int, seed: int) -> None:
    """Each rank gets its own saved stream back. At another world size there is no stream to give a
    new rank: every rank's is derived anew from (seed, rank, step), and dropout masks differ from an
    uninterrupted run from here on (the data order does not: it is global)."""
    ranks = ckpt.get("rng_ranks")
    if ranks is not None and len(ranks) == world_size:
        randomness.set_state(ranks[rank])
    elif ranks is None and rank == 0:  # a checkpoint from before per-rank streams
        randomness.set_state(ckpt["rng"])
    else:
        randomness.seed_rank(randomness.mix(seed, ckpt["step"]), rank)


def choose_resume(cfg, say: Callable[[str], None], verify_dir: Callable) -> tuple[Optional[Path], Optional[dict]]:
    """ckpt.resume: 'auto' takes the run directory's newest good checkpoint; a path starts a run
    from that file, but once the run has checkpoints of its own, restarts continue from those.
    Every rank reads the same files (read-only) and reaches the same decision (a sharded
    checkpoint's shards are verified by `verify_dir`, collectively)."""
    if cfg.ckpt.resume == "never":
        return None, None
    found = store.find_resumable(cfg.run_dir, say, verify_dir)
    if found:
        if cfg.ckpt.resume != "auto":
            say(f"note: {cfg.run_dir} has its own checkpoints; resuming from them, not from ckpt.resume={cfg.ckpt.resume}")
        return found
    if cfg.ckpt.resume != "auto":
        path = Path(cfg.ckpt.resume)
        state = store.load(path)
        if path.is_dir():
            verify_dir(path)
        return path, state
    return None, None


def save(t: Trainables, s: TrainState, totals: torch.Tensor, cfg, rt: Runtime, data_state: dict, strategy, stall=None, lost: bool = False, final: bool = True) -> bool:
    """Collective: the partial-epoch loss `totals` ([sum, count] on this rank) is summed over ranks,
    so a resume at any world size can finish the epoch mean; the strategy writes (launch.parallel).
    `lost` (rank 0: the run directory was replaced) rides on the same all-reduce: then nobody writes
    and every rank returns False."""
    finetune.check_optimizer(t.model, t.optimizer)  # a parameter replaced after the optimizer was built never trains
    totals = all_reduce_sum(torch.cat([totals, totals.new_tensor([float(lost)])]), rt)
    if totals[2] > 0:
        return False
    rngs = gather_to_main(randomness.state(), rt)
    at = replace(s, epoch_loss_sum=float(totals[0]), epoch_loss_count=float(totals[1]))
    strategy.write_checkpoint(t, at, cfg, data_state, rngs, stall, final)
    save_barrier(rt)
    return True
