"""train.cuda_graphs: the whole optimizer step in one CUDA graph, replayed.

A small model's eager step is launch-bound: the GPU does microseconds of work per kernel and the
CPU spends about a millisecond launching them. Captured once, the step (batch selection from the
device-resident data by a static index tensor, forward, loss, backward, clipping, the optimizer
update reading a device LR tensor that the scheduler fills in place) replays as one launch.

What runs eagerly instead: the first WARMUP full steps (they create optimizer state and warm the
allocator; they are ordinary training steps), the epoch's short last batch, fault-injected steps.
Agreement points, checkpoints and resume work as in eager mode: they happen between steps.
Graphs need one CUDA process with in-memory data, no accumulation and no fp16 GradScaler; `on`
refuses anything else in one line, `auto` falls back to eager.
"""

from __future__ import annotations

import torch

from launch.errors import UserError
from launch.train.optim import autocast_context
from launch.train.step import LossTally, TrainStep

WARMUP = 3
# Eager steps are launch-bound while 6 x parameters x batch (the step's FLOPs) stays far below what
# the GPU does in the ~1 ms it takes to launch them: below 1e9 parameter-samples a graph pays off.
LAUNCH_BOUND = 1e9
# `auto` only reports until the GPU lane has measured graphed == eager and the speed-up on real hardware.
AUTO_TURNS_ON = False


def blockers(cfg, rt, in_memory: bool) -> list[str]:
    out = []
    if rt.device.type != "cuda":
        out.append(f"the device is {rt.device.type}, not CUDA")
    if rt.env.world_size > 1:
        out.append(f"{rt.env.world_size} DDP processes (the gradient all-reduce is not captured; one process only)")
    if not in_memory:
        out.append("the data is not in-memory tensors (a DataLoader cannot feed a graph)")
    if cfg.train.accum_steps > 1:
        out.append("train.accum_steps > 1")
    if cfg.train.precision == "fp16":
        out.append("fp16's GradScaler checks gradients on the host (use bf16)")
    if cfg.train.compile:
        out.append("train.compile is on (compile_mode=reduce-overhead is torch.compile's own CUDA-graph path)")
    return out


def decide(cfg, rt, in_memory: bool, params: int) -> tuple[bool, str]:
    """(use graphs, a line for the run's start; empty when there is nothing to say)."""
    setting = cfg.train.cuda_graphs
    if setting == "off":
        return False, ""
    why_not = blockers(cfg, rt, in_memory)
    if why_not:
        if setting == "on":
            raise UserError(f"train.cuda_graphs=on: {'; '.join(why_not)}; use train.cuda_graphs=auto or off")
        return False, ""
    load = params * cfg.data.batch_size
    if setting == "auto" and load > LAUNCH_BOUND:
        return False, f"cuda_graphs auto: off ({params:,} parameters x batch {cfg.data.batch_size} is compute-bound; graphs would not help)"
    if setting == "auto" and not AUTO_TURNS_ON:
        return False, "cuda_graphs auto: this run qualifies, but auto stays off until graphs are measured on a GPU; train.cuda_graphs=on uses them"
    return True, f"cuda_graphs {setting}: on: full batches replay one captured CUDA graph ({params:,} parameters, batch {cfg.data.batch_size})"


class CudaGraph:
    """torch.cuda.CUDAGraph behind the two calls GraphedStep needs (a test substitutes a CPU stand-in)."""

    def __init__(self, body):
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            body()

    def replay(self) -> None:
        self.graph.replay()
        if self.eager.ema is not None:  # the captured step ends at the optimizer: the average follows it
            self.eager.ema.update()


class GraphedStep:
    """Same call as TrainStep, but its batches are (indices, n): full batches replay the graph."""

    wants_indices = True

    def __init__(self, eager: TrainStep, feeder, graph_class=None):
        self.eager = self.eager_step = eager
        self.feeder, self.graph_class = feeder, graph_class or CudaGraph
        self.task, self.optimizer = eager.task, eager.optimizer
        self.b = eager.cfg.data.batch_size
        self.idx = torch.zeros(self.b, dtype=torch.long, device=eager.rt.device)
        self.graph = None
        self.full_steps = 0
        self.loss = self.count = None

    def __call__(self, batches, n_micro: int, global_samples: int, tally: LossTally, poison: bool = False) -> None:
        idx, n = next(batches)
        full = n_micro == 1 and n == self.b == global_samples
        if not full or poison or self.full_steps < WARMUP:
            self.full_steps += full
            if self.graph is not None:  # the graph owns the gradient buffers: do not accumulate into them
                self.optimizer.zero_grad(set_to_none=True)
            inputs, target = self.feeder.select(idx)
            return self.eager(iter([(inputs, target, n)]), 1, global_samples, tally, poison)
        self.idx.copy_(idx, non_blocking=True)
        if self.graph is None:
            self._prepare()
            self.graph = self.graph_class(self._body)
        self.graph.replay()
        if self.eager.ema is not None:  # the captured step ends at the optimizer: the average follows it
            self.eager.ema.update()
        count = self.count if isinstance(self.count, int) else self.count.clone()
        tally.add(self.loss.clone(), count, self.task.static)
        self.eager.last = (self.loss, count)
        if self.eager.step_lr:
            self.eager.scheduler.step()  # fills the LR tensor the graph reads

    def _prepare(self) -> None:
        """Before capture: gradients unset (the graph allocates and owns them), LR as device
        tensors the scheduler fills in place, optimizer state on the device."""
        self.optimizer.zero_grad(set_to_none=True)
        device = self.idx.device
        for group in self.optimizer.param_groups:
            if not isinstance(group["lr"], torch.Tensor):
                group["lr"] = torch.tensor(float(group["lr"]), device=device)
            if "capturable" in group and device.type == "cuda":
                group["capturable"] = True
        for state in self.optimizer.state.values():
            if "step" in state and isinstance(state["step"], torch.Tensor):
                state["step"] = state["step"].to(device)

    def _body(self) -> None:
        """One full optimizer step, written for capture: no host reads, no allocation-dependent branches."""
        e = self.eager
        # The gradients are unset when this is captured, so the graph's backward writes them
        # afresh on every replay. Running this function again instead of replaying it (the CPU
        # stand-in in the tests) must not accumulate into them: zero them (records nothing on CUDA).
        self.optimizer.zero_grad(set_to_none=False)
        inputs, target = self.feeder.select(self.idx)
        with autocast_context(e.cfg, e.rt.device):
            loss, count = e.module(inputs, target)
        if self.task.static:
            loss.backward()  # a full batch of one process: weight 1
        else:
            (loss * e.counted_weight).backward()
            e.rescale_to_global(count)  # one process: the all-reduce inside is a no-op
        e.clip_gradients()
        self.optimizer.step()
        self.loss, self.count = loss.detach(), count
