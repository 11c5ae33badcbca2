"""log.profile_steps=START:END: torch.profiler over those optimizer steps on every rank.

Traces go to <run dir>/profile/rank<R>.steps<START>-<END>.pt.trace.json (open them in Perfetto,
chrome://tracing or TensorBoard's profiler); rank 0 prints one line with the top operators by
self time. Off by default, and then the loop calls two empty methods per step.
"""

from __future__ import annotations

from pathlib import Path

import torch

from launch.config.validate import profile_range


class NoProfiler:
    def before(self, step: int) -> None:
        pass

    def after(self, step: int) -> None:
        pass


class StepProfiler(NoProfiler):
    def __init__(self, spec: str, run_dir: Path, rank: int, device: torch.device, say):
        self.first, self.last = profile_range(spec)
        self.dir, self.rank, self.say = Path(run_dir) / "profile", rank, say
        self.activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            self.activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = None

    def before(self, step: int) -> None:
        if step == self.first and self.prof is None:
            self.prof = torch.profiler.profile(activities=self.activities, record_shapes=True, profile_memory=True)
            self.prof.__enter__()

    def after(self, step: int) -> None:
        if step != self.last or self.prof is None:
            return
        self.prof.__exit__(None, None, None)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"rank{self.rank}.steps{self.first}-{self.last}.pt.trace.json"
        self.prof.export_chrome_trace(str(path))
        self.say(f"profile: steps {self.first}-{self.last} -> {path}; top ops by self time: {top_ops(self.prof)}")
        self.prof = None


def top_ops(prof, n: int = 5) -> str:
    cuda = any(getattr(e, "self_device_time_total", 0) for e in prof.key_averages())
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:n]
    total = sum(getattr(e, key) for e in prof.key_averages()) or 1
    return ", ".join(f"{e.key} {getattr(e, key) / 1000:.2f}ms ({100 * getattr(e, key) / total:.0f}%)" for e in events)


def make_profiler(cfg, rank: int, device: torch.device, say):
    if not cfg.log.profile_steps:
        return NoProfiler()
    return StepProfiler(cfg.log.profile_steps, cfg.run_dir, rank, device, say)
