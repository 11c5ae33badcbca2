"""Setting up a run: data, model, loss, optimizer, resume, the run directory, the wrappers.

`start` does it in the order that keeps user mistakes cheap: everything that can be wrong with
the data, the model or the loss surfaces before a file is written or a collective is waited on.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import yaml
from torch import nn

from launch import config as config_mod, parallel
from launch.parallel import mesh
from launch.config import batch
from launch.checkpoint import changes, integrity, rundir, state as state_mod, store
from launch.checkpoint.state import Trainables, TrainState
from launch.data.build import build_data, check_sizes
from launch.data.feeder import make_feeder
from launch.data.types import DataBundle
from launch.errors import UserError
from launch.models.build import build_model
from launch.observe.logger import MetricsLog, check_trackers, read_metrics
from launch.observe.profiling import make_profiler
from launch.observe.resources import GradNormProbe, ResourceMeter
from launch.processes.dist import Runtime, print0, rank_table, save_barrier
from launch.processes.faults import Faults
from launch.processes.stopping import STOPPED, StopRequest, lost_run_dir
from launch.train import graph_step, randomness
from launch.train.ema import EMA
from launch.train.optim import make_optimizer, make_scaler, make_scheduler
from launch.train.step import TrainingModule, TrainStep
from launch.train.task import Task


@dataclass
class Run:
    """Everything the loop works with; built by `start`."""

    cfg: Any
    rt: Runtime
    stop: StopRequest
    say: Callable[[str], None]
    data: DataBundle
    task: Task
    parts: Trainables
    state: TrainState
    train_feed: Any  # launch.data.feeder.Feeder or launch.data.stream.StreamFeeder
    eval_feed: Any
    faults: Faults
    steps_per_epoch: Optional[int]  # None for a stream
    strategy: Any = None  # launch.parallel
    step: Any = None  # TrainStep
    metrics: Any = None
    resources: Any = None
    grad_probe: Any = None
    profiler: Any = None
    lock: Any = None
    started: float = field(default_factory=time.perf_counter)
    epoch_started: float = 0.0

    @property
    def bare(self) -> nn.Module:
        return self.parts.model

    @property
    def scheduler(self):
        return self.parts.scheduler

    def out_of_steps(self) -> bool:
        """train.max_steps reached (never, when it is 0)."""
        return bool(self.cfg.train.max_steps) and self.state.step >= self.cfg.train.max_steps

    def save(self, totals: torch.Tensor, final: bool = True) -> None:
        """Collective checkpoint of the current state; `totals` is this rank's [loss sum, count] of the
        partial epoch. Not `final` (a periodic save): the strategy may write it in the background."""
        stall = self.faults.save_stall(self.state.step)
        self.state.stream_state = getattr(self.train_feed, "state", None)
        if not state_mod.save(self.parts, self.state, totals, self.cfg, self.rt, self.data.state, self.strategy, stall, self.dir_lost(), final):
            raise lost_run_dir(self.cfg.run_dir)

    def dir_lost(self) -> bool:
        """Rank 0: the run directory was removed or replaced under this job (launch.checkpoint.rundir.RunLock)."""
        return self.lock is not None and not self.lock.still_ours()

    def finish(self, record: dict) -> dict:
        """After the last epoch: the final weights, prefix-free, as model.pt; then the trackers close with its path."""
        if not record:  # resumed a finished run
            self.say(f"nothing to do: the run in {self.cfg.run_dir} is already complete at step {self.state.step} (ckpt.resume=never starts fresh)")
            done = read_metrics(self.cfg.run_dir)
            record = done[-1] if done else {}
        weights = self.strategy.full_weights(self.bare)  # collective for a sharded model
        averaged = None
        if self.parts.ema is not None:
            with self.parts.ema.swapped_in():  # copies: a state_dict's tensors are the parameters, swapped back below
                averaged = {k: v.clone() for k, v in self.strategy.full_weights(self.bare).items()}
        if self.rt.env.is_main:
            if self.dir_lost():
                raise lost_run_dir(self.cfg.run_dir)
            store.save_weights(self.cfg.run_dir / "model.pt", weights)
            if averaged is not None:
                store.save_weights(self.cfg.run_dir / "model_ema.pt", averaged)
        self.metrics.close(self.cfg.run_dir / "model.pt")
        return record


def start(cfg, rt: Runtime, stop: StopRequest) -> Run:
    say = lambda msg: print0(msg, rt=rt)  # noqa: E731
    rundir.check_usable(cfg.run_dir)
    lay = mesh.layout(cfg, rt.env)  # the data-parallel ranks (dist.tp: a group's ranks share their samples)
    if cfg.train.global_batch:  # this world size's split, in a copy: the caller's config stays as given
        cfg = copy.deepcopy(cfg)
        say(batch.resolve(cfg, lay.data_size, lay.tp))
    data, bare, task, feeds, sample = _build(cfg, rt, lay)
    strategy = parallel.make(cfg, rt, say)
    strategy.prepare(bare, task, sample)  # before the optimizer: it may swap layers or shard parameters
    if not task.checked:  # a model built on the meta device exists only now
        task.check(bare, *sample)
    if task.output_note:
        say(task.output_note)
    randomness.seed_rank(cfg.train.seed, lay.data_rank)  # weights are initialised: from here on each rank draws its own stream (TP peers share one)
    per_epoch = feeds[0].steps_per_epoch(cfg.train.accum_steps)
    graphs, graph_note = graph_step.decide(cfg, rt, feeds[0].in_memory, sum(p.numel() for p in bare.parameters()))
    optimizer = make_optimizer(cfg, bare.parameters(), capturable=graphs and rt.device.type == "cuda")
    ema = EMA(bare, cfg.train.ema_decay, cfg.train.ema_warmup_steps) if cfg.train.ema_decay else None
    parts = Trainables(bare, optimizer, make_scheduler(cfg, optimizer, total_steps(cfg, per_epoch)), make_scaler(cfg, rt.device), ema)
    resumed_from, ckpt = state_mod.choose_resume(cfg, say, strategy.verify_dir)
    state = TrainState()
    if resumed_from is not None:
        state = state_mod.restore(ckpt, resumed_from, parts, rt.env.rank, rt.env.world_size, cfg.train.seed, strategy, rt)
        mesh.restream(ckpt, lay, cfg.train.seed)
        feeds[0].state = state.stream_state
    run = Run(cfg, rt, stop, say, data, task, parts, state, *feeds, Faults.from_env(rt.env.rank, rt.env.restart_count), per_epoch, strategy)
    try:
        _open_run_dir(run, resumed_from, ckpt)
        if rt.env.is_main:  # this run is under way: the last one's stop (if any) is history
            (cfg.run_dir / STOPPED).unlink(missing_ok=True)
        _finish_setup(run, graphs, graph_note)
    except BaseException:
        if run.lock is not None:
            run.lock.release()
        raise
    return run


def _finish_setup(run: Run, graphs: bool, graph_note: str) -> None:
    """The wrapped module, the step, and the per-run meters."""
    cfg, rt, say, bare, parts, data, state = run.cfg, run.rt, run.say, run.bare, run.parts, run.data, run.state
    optimizer, task = parts.optimizer, run.task
    module = _compile(cfg, run.strategy.wrap(TrainingModule(bare, task)))
    run.step = TrainStep(cfg, rt, module, bare, task, optimizer, parts.scheduler, parts.scaler, run.strategy)
    run.step.ema = parts.ema  # updated after every optimizer step (by the step: an optimizer hook would also
    # fire for the zero-learning-rate step torch's state_dict helpers take to create optimizer state)
    if graphs:
        run.step = graph_step.GraphedStep(run.step, run.train_feed)
    if graph_note:
        say(graph_note)
    run.resources = ResourceMeter(rt)
    # the norm at each epoch's last optimizer step, for the trackers (rank 0 alone: whole gradients only)
    if cfg.log.trackers and rt.env.is_main and run.steps_per_epoch and not run.strategy.lockstep_forward:
        first_end = state.step + run.train_feed.steps_left(state.samples_in_epoch, cfg.train.accum_steps)
        run.grad_probe = GradNormProbe(optimizer, bare.parameters(), lambda: run.state.step, first_end)
    run.profiler = make_profiler(cfg, rt.env.rank, rt.device, say)
    module.train()


def _build(cfg, rt: Runtime, lay):
    """Data, model and loss, checked against each other on a real batch; each rank is fed its
    data-parallel rank's share (`lay`, launch.parallel.mesh). Nothing is written yet."""
    say = lambda msg: print0(msg, rt=rt)  # noqa: E731
    data = build_data(cfg)
    for line in data.notes:
        say(line)
    ranks = lay.data_size
    check_sizes(data, cfg, ranks, "processes" if lay.tp == 1 else "data-parallel groups")
    check_trackers(cfg.log.trackers)  # on every rank: a missing package stops them all alike
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    bare = build_model(cfg, data.in_features, data.num_classes, rt, say)  # maybe on the meta device: sharded, then read (launch.models.shards)
    task = Task(cfg, bare)
    train_feed = make_feeder(data.train, cfg, rt.device, lay.data_rank, ranks, cfg.data.batch_size, counted=not lay.copy)
    eval_feed = make_feeder(data.eval, cfg, rt.device, lay.data_rank, ranks, cfg.data.eval_batch_size, counted=not lay.copy)
    inputs, target = train_feed.sample_batch()
    if not any(p.is_meta for p in bare.parameters()):  # else checked once the strategy has loaded it (start)
        task.check(bare, inputs, target)
    task.decide_counts(data.train, target)
    return data, bare, task, (train_feed, eval_feed), (inputs, target)


def total_steps(cfg, per_epoch: Optional[int]) -> int:
    """Optimizer steps the run will take (for the LR schedule): epochs, capped by train.max_steps."""
    if per_epoch is None:
        return cfg.train.max_steps
    total = per_epoch * cfg.train.epochs
    return min(total, cfg.train.max_steps) if cfg.train.max_steps else total


def _open_run_dir(run: Run, resumed_from, ckpt) -> None:
    """Rank 0 takes the run directory (one writer at a time), refuses a foreign one, makes sure the
    first save will succeed, writes config.yaml and tidies up; then the metrics log opens and every
    rank's table is printed."""
    cfg, rt, say = run.cfg, run.rt, run.say
    run_dir, ranks = cfg.run_dir, mesh.layout(cfg, rt.env).data_size  # data-parallel ranks: the checkpoint's world_size
    torn, changed = None, []
    if resumed_from is not None:
        before, torn = _saved_config(run_dir / "config.yaml", resumed_from, ckpt)
        saved = changes.saved_config(ckpt, before)
        was = (ckpt.get("batch_size", 0), ckpt.get("world_size", 0), (saved.get("train") or {}).get("accum_steps", 1))
        now = (cfg.data.batch_size, ranks, cfg.train.accum_steps)
        same_global = was[0] * was[1] * was[2] == now[0] * now[1] * now[2]
        changed, refused = changes.review(saved, cfg.to_dict(), same_global)
        if refused:
            where = f"run directory {run_dir} holds" if resumed_from.parent == store.checkpoint_dir(run_dir) else f"checkpoint {resumed_from} holds"
            raise UserError(
                f"{where} a run with a different config ({'; '.join(refused[:3])}): these settings define the run; "
                "use another run.dir, or ckpt.resume=never to start fresh there"
            )
        for line in changes.apply(changed, run.parts.optimizer, run.parts.scheduler, cfg, run.state.step):
            say(line)
        if not same_global:  # a different world size at the same per-process batch: a change of its own, named
            say(
                f"changed on resume at step {run.state.step}: the global batch {batch.describe(*was)} -> {batch.describe(*now)}; "
                f"train.global_batch={was[0] * was[1] * was[2]} keeps it at any world size"
            )
    if rt.env.is_main:
        run.lock = rundir.lock(run_dir)
        if changed:
            changes.keep_history(run_dir / "config.yaml", run.state.step)
        _prepare_run_dir(run, resumed_from, torn)
    save_barrier(rt)  # nobody reads the run directory while rank 0 rearranges it
    resumed = resumed_from is not None
    meta = {"name": cfg.run.name, "project": cfg.log.project, "config": cfg.to_dict()}
    run.metrics = MetricsLog(run_dir, rt.env.is_main, cfg.log.trackers, purge_step=run.state.step + 1 if resumed else 0, meta=meta)
    if run.lock is not None:  # a replaced run directory gets nothing more from this job (agreements stop it)
        run.metrics.guard = run.stop.guard = run.lock.still_ours
        run.lock.before_release.append(run.metrics.close)  # however the job ends, its trackers finish before the next job can start
    torn_lines = run.metrics.truncate_after(run.state.step if resumed else -1)
    if torn_lines:
        say(torn_lines)
    for line in rank_table(rt):  # every rank's launcher, host and device, printed by rank 0
        say(line)
    if resumed:
        say(f"resumed from {resumed_from} (epoch {run.state.epoch}, step {run.state.step})")
        if ckpt["world_size"] != ranks:
            say(f"note: checkpoint was written with world size {ckpt['world_size']}, resuming with {ranks}: "
                f"epoch {run.state.epoch} continues at sample {run.state.samples_in_epoch} of its permutation")
    if rt.env.restart_count:
        say(f"torchrun restart {rt.env.restart_count} (TORCHELASTIC_RESTART_COUNT)")


def _saved_config(saved, resumed_from, ckpt) -> tuple[dict, Optional[str]]:
    """The config the run directory was written with, and what is wrong with config.yaml if it is
    torn (a write cut short) or garbage: then the config inside the run's own checkpoint stands in."""
    if not saved.exists():
        return {}, None
    try:
        raw = saved.read_bytes()
        body = yaml.safe_load(raw)
        problem = None if isinstance(body, dict) and raw.endswith(b"\n") else "incomplete"
    except (OSError, ValueError, yaml.YAMLError) as e:  # ValueError: not UTF-8
        problem = " ".join(str(e).split())[:80] or type(e).__name__
    if problem is None:
        return body, None
    own = resumed_from.parent == store.checkpoint_dir(saved.parent) and isinstance(ckpt.get("config"), dict)
    return (ckpt["config"] if own else {}), problem


def _prepare_run_dir(run: Run, resumed_from, torn: Optional[str]) -> None:
    """Rank 0 under the lock: move aside what must not be overwritten or used, check that the first
    save will succeed (before step 1, not hours later), then write config.yaml."""
    cfg, say, run_dir = run.cfg, run.say, run.cfg.run_dir
    if cfg.ckpt.resume == "never":
        moved = rundir.move_previous_run(run_dir)
        if moved:
            say(f"ckpt.resume=never: moved the previous run's files to {moved}")
    else:
        if torn:
            kept = integrity.set_aside(run_dir / "config.yaml", "torn")
            own = resumed_from.parent == store.checkpoint_dir(run_dir)
            compared = f"compared this run with the config inside {resumed_from.name}" if own else "nothing to compare this run with"
            say(f"{run_dir / 'config.yaml'} was torn ({torn}); kept it as {kept.name}; {compared}")
        store.set_aside_unusable(run_dir, resumed_from, say)
    store.clean_temporaries(run_dir)
    rundir.check_checkpoint_room(store.checkpoint_dir(run_dir), store.estimate_bytes(run.bare, run.parts.optimizer))
    config_mod.save(cfg, run_dir / "config.yaml")


def _compile(cfg, module: nn.Module) -> nn.Module:
    if cfg.train.compile:
        # mode="reduce-overhead" records CUDA graphs: worth it for small models whose steps are launch-bound.
        module = torch.compile(module, mode=None if cfg.train.compile_mode == "default" else cfg.train.compile_mode)
    return module
