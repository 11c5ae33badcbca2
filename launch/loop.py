"""The one training loop, for every launcher.

Per optimizer step: accum_steps micro-batches (DDP syncs gradients only on the last),
optional clipping, optimizer and LR-schedule step. Every train.check_every_steps steps,
before every checkpoint and at every epoch end, the ranks agree (one tiny all-reduce) on
two flags: somebody asked to stop (signal or STOP file) and somebody saw a non-finite
loss. The hot path does no host synchronisation besides that.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from launch import checkpoint, config as config_mod
from launch.data import DataBundle, Feeder, build as build_data, resume_offset, steps_per_epoch
from launch.dist import Runtime, all_reduce_sum, print0, rank_table, save_barrier
from launch.errors import EXIT_NONFINITE, EXIT_STOPPED, UserError
from launch.faults import Faults
from launch.logger import MetricsLog, epoch_line, progress_bar, read_metrics, tensorboard_writer_class
from launch.model import build_model, clean_state_dict, unwrap
from launch.resources import GradNormProbe, ResourceMeter


class Stopped(Exception):
    """Training stopped early on purpose; carries the exit code and a one-line message."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- stop requests


class StopRequest:
    """Signal handlers only set a flag; the loop acts on it at the next agreement point.
    A second signal of the same kind at least a second later exits at once. (Under torchrun a
    Ctrl-C reaches the workers twice within milliseconds: from the terminal and forwarded by the
    agent. That pair counts as one.)"""

    def __init__(self, stop_file: Path):
        self.signum = 0
        self.first_at = 0.0
        self.stop_file = stop_file

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def install(self) -> dict:
        """Install the handlers; return the previous ones (restored when training returns)."""
        return {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum and now - self.first_at > 1.0:
            os._exit(128 + signum)
        if not self.signum:
            self.signum, self.first_at = signum, now

    def requested(self) -> bool:
        return bool(self.signum) or self.stop_file.exists()

    def reason(self) -> str:
        if self.signum:
            return signal.Signals(self.signum).name
        return f"stop file {self.stop_file}"


# --------------------------------------------------------------------------- pieces


def make_optimizer(cfg, params) -> torch.optim.Optimizer:
    t = cfg.train
    params = list(params)
    # On CUDA the fused kernels update every tensor in one launch (fewer launches per step
    # for small models); elsewhere torch's default implementation, so CPU results stay bitwise
    # comparable with a hand-written loop.
    fused = True if params and all(p.is_cuda for p in params) else None
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=fused)
    return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, fused=fused)


def lr_factor(cfg, total_steps: int):
    """Multiplier of train.lr at optimizer step s (0-based), per step."""
    t = cfg.train

    def factor(s: int) -> float:
        if t.warmup_steps and s < t.warmup_steps:
            return (s + 1) / t.warmup_steps
        if t.schedule == "step":
            return t.gamma ** (s // t.step_every)
        if t.schedule == "cosine":
            span = max(1, total_steps - t.warmup_steps)
            progress = min(1.0, (s - t.warmup_steps) / span)
            return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor


def autocast_context(cfg, device: torch.device):
    if cfg.train.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, feeder: Feeder, rt: Runtime, cfg) -> tuple[float, float, int]:
    """Exact evaluation: each sample on one rank, sums and counts all-reduced, divided once.
    `model` must be the bare module (no DDP forward, so no hidden collectives)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=rt.device)  # loss sum, correct, count
    for x, y in feeder.eval_batches():
        with autocast_context(cfg, rt.device):
            logits = model(x)
        # Per-sample losses summed in float64: the total then barely depends on how samples are split into batches.
        totals[0] += F.cross_entropy(logits.float(), y, reduction="none").double().sum()
        totals[1] += (logits.argmax(dim=1) == y).sum()
        totals[2] += y.numel()
    all_reduce_sum(totals, rt)
    model.train(was_training)
    loss_sum, correct, count = totals.tolist()
    if count == 0:
        return float("nan"), float("nan"), 0
    return loss_sum / count, correct / count, int(count)


def fold_losses(loss_sum: torch.Tensor, pending: list, sizes: list) -> int:
    """Add the pending micro-batch mean losses, each times its sample count, to the float64 sum
    in place; return the number of samples added. The step only appends a detached loss (no
    tensor op, no sync); folding happens at agreement points and epoch ends, the same steps in
    an uninterrupted and a resumed run, so the sum is reproducible bit for bit."""
    if not pending:
        return 0
    losses = torch.stack(pending)
    if min(sizes) == max(sizes):  # the usual case, in three tensor ops
        loss_sum.add_(losses.sum(dtype=torch.float64), alpha=sizes[0])
    else:  # an epoch's short last batch
        loss_sum += (losses.double() * torch.tensor(sizes, dtype=torch.float64).to(loss_sum.device)).sum()
    added = sum(sizes)
    pending.clear()
    sizes.clear()
    return added


@dataclass
class Position:
    epoch: int = 0
    step: int = 0  # optimizer steps done in total
    samples_in_epoch: int = 0  # global samples consumed in `epoch` (the resume point inside it)
    epoch_loss_sum: float = 0.0  # global train-loss sum so far in `epoch` (this rank's share on save)
    epoch_loss_count: int = 0


# --------------------------------------------------------------------------- the run


def prepare_run_dir(cfg, rt: Runtime, resumed_from, warn) -> None:
    """Rank 0: create the run directory, refuse a foreign one, write config.yaml."""
    run_dir = cfg.run_dir
    saved = run_dir / "config.yaml"
    if resumed_from is not None and saved.exists():
        import yaml

        changes = config_mod.differences(yaml.safe_load(saved.read_text()) or {}, cfg.to_dict())
        if changes:
            raise UserError(
                f"run directory {run_dir} holds a run with a different config ({'; '.join(changes[:3])}); "
                "use another run.dir, or ckpt.resume=never to start fresh there"
            )
    if rt.env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_mod.save(cfg, saved)


def train(cfg, rt: Runtime) -> dict:
    """Train to the configured number of epochs (resuming if there is a checkpoint); return the last epoch's record."""
    stop = StopRequest(cfg.run_dir / "STOP")
    previous = stop.install()
    try:
        return _train(cfg, rt, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _train(cfg, rt: Runtime, stop: StopRequest) -> dict:
    env = rt.env
    main = env.is_main
    run_dir = cfg.run_dir
    say = lambda msg: print0(msg, rt=rt)  # noqa: E731
    faults = Faults.from_env(env.rank, env.restart_count)

    # Data and model first: most user mistakes surface here, before anything is written.
    data: DataBundle = build_data(cfg)
    global_batch = cfg.data.batch_size * env.world_size
    if len(data.train) < global_batch:
        raise UserError(
            f"the training set has {len(data.train)} samples, fewer than one global batch "
            f"({cfg.data.batch_size} per process x {env.world_size} processes = {global_batch})"
        )
    if len(data.eval) == 0:
        raise UserError("the evaluation set is empty")
    if cfg.log.tensorboard:
        tensorboard_writer_class()  # on every rank: a missing package stops them all alike
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(cfg, data.in_features, data.num_classes).to(rt.device)
    optimizer = make_optimizer(cfg, model.parameters())
    per_epoch = steps_per_epoch(len(data.train), cfg.data.batch_size, env.world_size, cfg.train.accum_steps)
    total_steps = per_epoch * cfg.train.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, total_steps))
    scaler = torch.amp.GradScaler(rt.device.type) if cfg.train.precision == "fp16" else None

    # Resume: every rank reads the same files (read-only) and reaches the same decision.
    pos = Position()
    resumed_from = None
    if cfg.ckpt.resume != "never":
        found = checkpoint.find_resumable(run_dir, say)
        if found:
            resumed_from, ckpt = found
            if cfg.ckpt.resume != "auto":  # a restart of a run that began from a given checkpoint
                say(f"note: {run_dir} has its own checkpoints; resuming from them, not from ckpt.resume={cfg.ckpt.resume}")
        elif cfg.ckpt.resume != "auto":
            resumed_from, ckpt = Path(cfg.ckpt.resume), checkpoint.load(Path(cfg.ckpt.resume))
    if resumed_from is not None:
        try:
            model.load_state_dict(clean_state_dict(ckpt["model"]))
        except RuntimeError as e:
            detail = " ".join(str(e).split())
            raise checkpoint.CheckpointError(f"checkpoint {resumed_from}: does not fit this model ({detail[:300]})") from None
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scheduler") is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        checkpoint.set_rng_state(ckpt["rng"])
        pos = Position(ckpt["epoch"], ckpt["step"], resume_offset(ckpt["samples_in_epoch"], env.world_size))
        if main:  # the saved partial-epoch loss is a global sum: rank 0 alone carries it forward
            pos.epoch_loss_sum, pos.epoch_loss_count = ckpt["epoch_loss_sum"], ckpt["epoch_loss_count"]
        if ckpt["world_size"] != env.world_size:
            say(
                f"note: checkpoint was written with world size {ckpt['world_size']}, resuming with {env.world_size}: "
                f"epoch {pos.epoch} continues at sample {pos.samples_in_epoch} of its permutation (exact only at the same world size)"
            )
    prepare_run_dir(cfg, rt, resumed_from, say)
    if main:
        if cfg.ckpt.resume == "never":
            moved = checkpoint.move_aside(run_dir)
            if moved:
                say(f"ckpt.resume=never: moved the old checkpoints to {moved}")
        checkpoint.clean_temporaries(run_dir)
    save_barrier(rt)  # nobody reads the run directory while rank 0 rearranges it

    metrics = MetricsLog(run_dir, main, cfg.log.tensorboard, purge_step=pos.step + 1 if resumed_from is not None else 0)
    metrics.truncate_after(pos.step if resumed_from is not None else -1)
    for line in rank_table(rt):  # every rank's launcher, host and device, printed by rank 0
        say(line)
    if resumed_from is not None:
        say(f"resumed from {resumed_from} (epoch {pos.epoch}, step {pos.step})")
    if env.restart_count:
        say(f"torchrun restart {env.restart_count} (TORCHELASTIC_RESTART_COUNT)")

    bare = model
    if env.distributed:
        d = cfg.dist
        model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
            bucket_cap_mb=d.bucket_cap_mb,
            gradient_as_bucket_view=d.gradient_as_bucket_view,
            static_graph=d.static_graph,
            find_unused_parameters=d.find_unused_parameters,
        )
    if cfg.train.compile:
        # mode="reduce-overhead" records CUDA graphs: worth it for small models whose steps are launch-bound.
        model = torch.compile(model, mode=None if cfg.train.compile_mode == "default" else cfg.train.compile_mode)

    train_feed = Feeder(data.train, cfg, rt.device, env.rank, env.world_size, cfg.data.batch_size)
    eval_feed = Feeder(data.eval, cfg, rt.device, env.rank, env.world_size, cfg.data.eval_batch_size)
    resources = ResourceMeter(rt)
    grad_probe = None
    if cfg.log.tensorboard and main:  # the norm at each epoch's last optimizer step, for TensorBoard
        first_end = pos.step + steps_per_epoch(len(data.train) - pos.samples_in_epoch, cfg.data.batch_size, env.world_size, cfg.train.accum_steps)
        grad_probe = GradNormProbe(optimizer, bare.parameters(), lambda: pos.step, first_end)

    def state(samples_in_epoch: int, loss_sum: float, loss_count: int) -> dict:
        return {
            "model": clean_state_dict(unwrap(model).state_dict()),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": pos.epoch,
            "step": pos.step,
            "samples_in_epoch": samples_in_epoch,
            "epoch_loss_sum": loss_sum,
            "epoch_loss_count": loss_count,
            "world_size": env.world_size,
            "batch_size": cfg.data.batch_size,
            "rng": checkpoint.rng_state(),
            "config": cfg.to_dict(),
            "data_state": data.state,
            "torch_version": str(torch.__version__),
        }

    def save_checkpoint(samples_in_epoch: int, loss_sum: torch.Tensor, loss_count: int) -> None:
        # The partial-epoch train loss is summed over ranks so a resume at any world size can finish the epoch mean.
        totals = torch.stack([loss_sum.double(), loss_sum.new_tensor(float(loss_count), dtype=torch.float64)])
        all_reduce_sum(totals, rt)
        if main:
            path = checkpoint.save(
                state(samples_in_epoch, float(totals[0]), int(totals[1])),
                run_dir, pos.step, cfg.ckpt.keep_last, faults.save_stall(pos.step),
            )
            say(f"saved {path}")
        save_barrier(rt)

    def agree(loss_sum: torch.Tensor) -> tuple[bool, bool]:
        """All ranks learn whether anyone wants to stop and whether anyone's loss went non-finite.
        Flags are built on the device and read back once (one host sync). Alone, there is nobody
        to agree with: one read of the sum is the whole check."""
        if env.world_size == 1:
            return stop.requested(), not math.isfinite(loss_sum.item())
        flags = torch.stack([loss_sum.new_full((), float(stop.requested())), (~torch.isfinite(loss_sum)).to(loss_sum.dtype)])
        all_reduce_sum(flags, rt)
        wants_stop, nonfinite = flags.tolist()
        return wants_stop > 0, nonfinite > 0

    # Hoisted out of the step: the hot path should cost what a hand-written loop costs.
    accum = cfg.train.accum_steps
    batch = cfg.data.batch_size
    ddp = env.distributed
    clip = cfg.train.grad_clip
    clip_params = [p for p in bare.parameters() if p.requires_grad]
    # A constant schedule without warmup has factor 1 forever: LambdaLR.step() would only cost time.
    step_lr = cfg.train.schedule != "constant" or cfg.train.warmup_steps > 0
    amp = contextlib.nullcontext() if cfg.train.precision == "fp32" else None
    pending: list[torch.Tensor] = []  # detached micro-batch losses not yet folded into loss_sum
    sizes: list[int] = []
    t_start = time.perf_counter()
    result: dict = {}
    model.train()
    for epoch in range(pos.epoch, cfg.train.epochs):
        pos.epoch = epoch
        start = pos.samples_in_epoch
        loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
        loss_sum += pos.epoch_loss_sum
        count = pos.epoch_loss_count  # samples in loss_sum; a host int, it needs no device op per step
        pos.epoch_loss_sum, pos.epoch_loss_count = 0.0, 0
        rank_samples = math.ceil((len(data.train) - start) / env.world_size)  # equal on every rank (padded order)
        n_micro = math.ceil(rank_samples / batch)
        bar = progress_bar(math.ceil(n_micro / accum), f"epoch {epoch}", cfg.log.progress, main)
        t_epoch = time.perf_counter()
        samples_seen = 0
        micro = 0
        group_end = 0
        group_samples = 0
        poison = False
        save_at_end = False
        for x, y in train_feed.train_epoch(cfg.train.seed, epoch, start):
            n = y.shape[0]
            if micro == group_end:  # first micro-batch of an optimizer step
                group_end = min(micro + accum, n_micro)
                group_samples = min(accum * batch, rank_samples - micro * batch)
                poison = faults.before_step(pos.step + 1)
            micro += 1
            last_micro = micro == group_end
            with contextlib.nullcontext() if (last_micro or not ddp) else model.no_sync():
                with amp or autocast_context(cfg, rt.device):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y)  # float32 loss under autocast too (no-op in fp32)
                if poison:
                    loss = loss * float("nan")
                # Weight each micro-batch by its share of the step's samples: the summed gradient is then
                # exactly the mean over one big batch, short epoch-tail micro-batches included.
                scaled = loss * (n / group_samples) if n != group_samples else loss
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            pending.append(loss.detach())
            sizes.append(n)
            samples_seen += n
            if not last_micro:
                continue
            if scaler is not None:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            if clip > 0:
                nn.utils.clip_grad_norm_(clip_params, clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step_lr:
                scheduler.step()
            pos.step += 1
            if bar is not None:
                bar.update(1)
            consumed = start + micro * batch * env.world_size
            if faults.stop_after(pos.step):
                stop.signum = stop.signum or signal.SIGTERM
            due = bool(cfg.ckpt.every_steps) and pos.step % cfg.ckpt.every_steps == 0
            if micro == n_micro:  # the epoch's last step: the epoch end agrees, saves and stops
                save_at_end |= due
            elif due or pos.step % cfg.train.check_every_steps == 0:
                count += fold_losses(loss_sum, pending, sizes)
                wants_stop, nonfinite = agree(loss_sum)
                if nonfinite:
                    raise Stopped(nonfinite_message(cfg, pos.step, epoch), EXIT_NONFINITE)
                if wants_stop or due:
                    save_checkpoint(consumed, loss_sum, count)
                if wants_stop:
                    _finish_stop(stop, rt, pos, run_dir, True)
            if cfg.log.every_steps and pos.step % cfg.log.every_steps == 0:
                metrics.write({"epoch": epoch, "step": pos.step, "train_loss_step": float(loss.detach()), "lr": scheduler.get_last_lr()[0]})
        count += fold_losses(loss_sum, pending, sizes)
        if bar is not None:
            bar.close()

        # End of epoch: one agreement, the global train loss, exact evaluation, log, checkpoint.
        wants_stop, nonfinite = agree(loss_sum)
        if nonfinite:
            raise Stopped(nonfinite_message(cfg, pos.step, epoch), EXIT_NONFINITE)
        totals = torch.stack([loss_sum, loss_sum.new_tensor(float(count))])
        all_reduce_sum(totals, rt)
        seen = torch.tensor([float(samples_seen)], device=rt.device)
        all_reduce_sum(seen, rt)
        epoch_time = time.perf_counter() - t_epoch
        eval_loss, eval_acc, eval_n = evaluate(bare, eval_feed, rt, cfg)
        result = {
            "epoch": epoch,
            "step": pos.step,
            "train_loss": float(totals[0] / totals[1]),
            "eval_loss": eval_loss,
            "eval_accuracy": eval_acc,
            "eval_samples": eval_n,
            "samples_per_s": float(seen[0]) / max(epoch_time, 1e-9),
            "elapsed_s": time.perf_counter() - t_start,
            "lr": scheduler.get_last_lr()[0],
            "world_size": env.world_size,
            **resources.figures(),
        }
        if grad_probe is not None:
            result["grad_norm"] = grad_probe.take(pos.step + per_epoch)
        metrics.write(result)
        say(epoch_line(result))
        pos.epoch, pos.samples_in_epoch = epoch + 1, 0
        zero = torch.zeros((), dtype=torch.float64, device=rt.device)
        is_last = epoch + 1 == cfg.train.epochs
        if is_last or wants_stop or save_at_end or (cfg.ckpt.every_epochs and (epoch + 1) % cfg.ckpt.every_epochs == 0):
            save_checkpoint(0, zero, 0)
        if wants_stop and not is_last:
            _finish_stop(stop, rt, pos, run_dir, False)

    metrics.close()
    if not result:  # resumed a finished run
        say(f"nothing to do: the run in {run_dir} is already complete at step {pos.step} (ckpt.resume=never starts fresh)")
        done = read_metrics(run_dir)
        result = done[-1] if done else {}
    if main:
        final = clean_state_dict(unwrap(model).state_dict())
        checkpoint.atomic_write(run_dir / "model.pt", lambda f: torch.save(final, f))
    return result


def nonfinite_message(cfg, step: int, epoch: int) -> str:
    return (
        f"non-finite loss (NaN/inf) detected at step {step} (epoch {epoch}; checked every "
        f"{cfg.train.check_every_steps} steps); no checkpoint written after it, the last good one is kept"
    )


def _finish_stop(stop: StopRequest, rt: Runtime, pos: Position, run_dir: Path, mid_epoch: bool) -> None:
    if rt.env.is_main:
        (run_dir / "STOP").unlink(missing_ok=True)  # consumed: a requeued job must not stop again at once
    where = f"mid-epoch {pos.epoch}" if mid_epoch else f"after epoch {pos.epoch - 1}"
    raise Stopped(f"stopped by {stop.reason()} at step {pos.step} ({where}); checkpoint saved, rerun the same command to resume", EXIT_STOPPED)
