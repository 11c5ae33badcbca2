"""The training loop, for every launcher. It reads like the seeds' loop:

    run = start(cfg, rt)                      # data, model, loss, optimizer, resume, run directory
    for epoch in remaining epochs:
        train_epoch(run)                      # optimizer steps (launch.train.step), agreement, checkpoints
        record = finish_epoch(run)            # global train loss, exact eval, log, checkpoint

Everything a step needs lives in launch.train.step; what a checkpoint holds in launch.checkpoint.state; the data
order in launch.data.order; stop requests and their agreement in launch.processes.stopping.
"""

from __future__ import annotations

import signal
import time

import torch

from launch.observe.logger import epoch_line, progress_bar
from launch.processes.dist import Runtime, all_reduce_sum
from launch.processes.stopping import StopRequest, agree, nonfinite, stopped
from launch.train.evaluate import evaluate
from launch.train.run import Run, start
from launch.train.step import LossTally


def train(cfg, rt: Runtime) -> dict:
    """Train to the configured number of epochs or train.max_steps (resuming if there is a checkpoint); return the last record."""
    stop = StopRequest(cfg.run_dir / "STOP")
    previous = stop.install()
    run = None
    try:
        run = start(cfg, rt, stop)
        record: dict = {}
        for epoch in range(run.state.epoch, cfg.train.epochs):
            if run.out_of_steps():
                break
            run.state.epoch = epoch
            tally, seen, save_at_end, complete = train_epoch(run)
            record = finish_epoch(run, tally, seen, save_at_end, complete)
        return run.finish(record)
    finally:
        if run is not None and run.lock is not None:
            run.lock.release()  # the process may train again (in-process callers); the OS would release it at exit anyway
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train_epoch(run: Run) -> tuple[LossTally, int, bool, bool]:
    """One pass over this rank's share of the epoch, from the resume point if there is one, or up to
    train.max_steps. Returns the loss tally, the samples this rank saw, whether a checkpoint is due
    at the end, and whether the epoch is complete (False: train.max_steps cut it)."""
    cfg, rt, s = run.cfg, run.rt, run.state
    accum = cfg.train.accum_steps
    tally = LossTally(rt.device, s.epoch_loss_sum, s.epoch_loss_count)
    s.epoch_loss_sum, s.epoch_loss_count = 0.0, 0
    steps = run.train_feed.epoch_steps(cfg.train.seed, s.epoch, s.samples_in_epoch, accum, run.step.wants_indices)
    bar = progress_bar(run.train_feed.steps_left(s.samples_in_epoch, accum), f"epoch {s.epoch}", cfg.log.progress, rt.env.is_main)
    run.epoch_started = time.perf_counter()
    save_at_end, seen, complete = False, 0, True
    for plan in steps:
        poison = run.faults.before_step(s.step + 1)
        run.profiler.before(s.step + 1)
        run.step(plan.batches, plan.n_micro, plan.global_samples, tally, poison)
        s.step += 1
        run.profiler.after(s.step)
        if bar is not None:
            bar.update(1)
        s.samples_in_epoch, seen = plan.position, seen + plan.mine
        if run.faults.stop_after(s.step):
            run.stop.signum = run.stop.signum or signal.SIGTERM
        due = bool(cfg.ckpt.every_steps) and s.step % cfg.ckpt.every_steps == 0
        cut = run.out_of_steps() and not plan.last
        if plan.last or cut:  # the epoch's (or the run's) last step: the epoch end agrees, saves and stops
            save_at_end |= due
        elif due or s.step % cfg.train.check_every_steps == 0:
            checkpoint_mid_epoch(run, tally, due)
        if cfg.log.every_steps and s.step % cfg.log.every_steps == 0:
            run.metrics.write({"epoch": s.epoch, "step": s.step, "train_loss_step": run.step.eager_step.last_loss(), "lr": float(run.scheduler.get_last_lr()[0])})
        if cut:
            complete = False
            break
    if bar is not None:
        bar.close()
    return tally, seen, save_at_end, complete


def checkpoint_mid_epoch(run: Run, tally: LossTally, due: bool) -> None:
    """An agreement point inside an epoch: stop on a non-finite loss, save if due or asked to stop."""
    tally.fold()
    wants_stop, bad = agree(run.stop, tally.sum, run.rt)
    if bad:
        raise nonfinite(run.cfg, run.state.step, run.state.epoch)
    if wants_stop or due:
        run.save(tally.totals(), final=wants_stop)
    if wants_stop:
        raise stopped(run.stop, run.rt, run.cfg.run_dir, run.state.step, f"mid-epoch {run.state.epoch}")


def finish_epoch(run: Run, tally: LossTally, seen: int, save_at_end: bool, complete: bool = True) -> dict:
    """One agreement, the global train loss, exact evaluation, the record, the checkpoint. An epoch
    cut by train.max_steps is recorded the same way, and its checkpoint keeps the position in it."""
    cfg, rt, s = run.cfg, run.rt, run.state
    epoch = s.epoch
    tally.fold()
    wants_stop, bad = agree(run.stop, tally.sum, rt)
    if bad:
        raise nonfinite(cfg, s.step, epoch)
    totals = all_reduce_sum(torch.cat([tally.totals(), tally.sum.new_tensor([float(seen)])]), rt)
    epoch_time = time.perf_counter() - run.epoch_started
    record = {"epoch": epoch, "step": s.step, "train_loss": float(totals[0] / totals[1])}
    run.strategy.before_eval(run.bare)
    record.update(evaluate(run.bare, run.task, run.eval_feed, rt, cfg, run.strategy.lockstep_forward))
    if run.parts.ema is not None:  # the averaged weights, on the same samples
        with run.parts.ema.swapped_in():
            averaged = evaluate(run.bare, run.task, run.eval_feed, rt, cfg, run.strategy.lockstep_forward)
        record.update({f"{k}_ema": v for k, v in averaged.items() if k != "eval_samples"})
    record.update(
        samples_per_s=float(totals[2]) / max(epoch_time, 1e-9),
        elapsed_s=time.perf_counter() - run.started,
        lr=float(run.scheduler.get_last_lr()[0]),
        world_size=rt.env.world_size,
        **run.resources.figures(),
    )
    if run.grad_probe is not None:
        record["grad_norm"] = run.grad_probe.take(s.step + (run.steps_per_epoch or 0))
    run.metrics.write(record)
    run.say(epoch_line(record))
    if complete:
        s.epoch, s.samples_in_epoch = epoch + 1, 0
    is_last = epoch + 1 == cfg.train.epochs or run.out_of_steps()
    if is_last or wants_stop or save_at_end or (cfg.ckpt.every_epochs and (epoch + 1) % cfg.ckpt.every_epochs == 0):
        run.save(torch.zeros(2, dtype=torch.float64, device=rt.device) if complete else tally.totals(), final=is_last or wants_stop)
    if wants_stop and not is_last:
        raise stopped(run.stop, rt, cfg.run_dir, s.step, f"after epoch {epoch}")
    return record
