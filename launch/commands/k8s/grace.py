"""How long a pod may take to stop: terminationGracePeriodSeconds, from what a stop has to do in it.

On SIGTERM (pod deletion, node drain, preemption) the workers only set a flag (launch.processes.stopping).
The time until the last process is gone is then at most:

  train.check_every_steps x seconds per step   the flag is read at the next agreement
+ checkpoint size / write bandwidth             rank 0 saves the full state on the volume
+ EXIT_SECONDS                                  torchrun passing the signal on, process-group teardown, exits, margin

rounded up to 10 s, and at least Kubernetes' own default of 30 s. The two unknowns are measured from
the run directory the settings resolve to on the rendering machine when a run is there (the size of
the checkpoint `latest` names; the slowest epoch's seconds per step in metrics.jsonl), else taken
from the options, else assumed (ASSUMED_*); the YAML says which. torchrun's own --shutdown-timeout
(how long it waits for its workers before SIGKILL; 30 s when not given) is set TORCHRUN_MARGIN below
it, so torchrun reaps its workers before the kubelet kills the pod.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

EXIT_SECONDS = 20
ASSUMED_STEP_SECONDS = 2.0
ASSUMED_CHECKPOINT_GB = 1.0
TORCHRUN_MARGIN = 5
KUBERNETES_DEFAULT = 30


@dataclass
class Grace:
    seconds: int  # terminationGracePeriodSeconds
    shutdown_timeout: int  # torchrun --shutdown-timeout
    how: list[str]  # the sum and where each term came from, for the YAML's comment


def checkpoint_bytes(run_dir: Path) -> int | None:
    """Size of the checkpoint `latest` names (a .pt file, or a sharded .dcp directory), None without one."""
    try:
        name = (run_dir / "checkpoints" / "latest").read_text().strip()
    except OSError:
        return None
    path = run_dir / "checkpoints" / name
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return None


def seconds_per_step(run_dir: Path) -> float | None:
    """The slowest epoch's wall time per optimizer step (training and evaluation) in metrics.jsonl:
    consecutive epoch records of one process, None when there are not two."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    epochs = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "elapsed_s" in rec and "step" in rec:
            epochs.append((float(rec["elapsed_s"]), int(rec["step"])))
    rates = [(t1 - t0) / (s1 - s0) for (t0, s0), (t1, s1) in zip(epochs, epochs[1:]) if t1 > t0 and s1 > s0]
    return max(rates) if rates else None


def estimate(check_every_steps: int, run_dir: Path, grace_seconds: int = 0, checkpoint_gb: float = 0.0,
             step_seconds: float = 0.0, write_mb_s: float = 100.0) -> Grace:
    """The grace period for a job whose run directory on this machine is `run_dir` (it may not exist)."""
    if grace_seconds:
        seconds = grace_seconds
        how = [f"{seconds} s as given (--grace-seconds)"]
    else:
        measured_step = None if step_seconds else seconds_per_step(run_dir)
        step, step_from = (
            (step_seconds, "--step-seconds") if step_seconds
            else (measured_step, f"measured: slowest epoch in {run_dir}/metrics.jsonl") if measured_step
            else (ASSUMED_STEP_SECONDS, f"assumed: no run in {run_dir} to measure; --step-seconds")
        )
        measured_size = None if checkpoint_gb else checkpoint_bytes(run_dir)
        size_gb, size_from = (
            (checkpoint_gb, "--checkpoint-gb") if checkpoint_gb
            else (measured_size / 1e9, f"measured: {run_dir}/checkpoints/latest") if measured_size
            else (ASSUMED_CHECKPOINT_GB, "assumed; --checkpoint-gb")
        )
        wait, write = check_every_steps * step, size_gb * 1000 / write_mb_s
        total = wait + write + EXIT_SECONDS
        seconds = max(KUBERNETES_DEFAULT, 10 * math.ceil(total / 10))
        how = [
            f"  {check_every_steps} step(s) to the next agreement (train.check_every_steps) x {step:.3g} s per step ({step_from})",
            f"+ {size_gb:.3g} GB checkpoint ({size_from}) / {write_mb_s:g} MB/s written to the volume (--write-mb-s)",
            f"+ {EXIT_SECONDS} s for torchrun to pass SIGTERM on, the process-group teardown and the exits",
            f"= {total:.1f} s, rounded up to 10 s (at least Kubernetes' default {KUBERNETES_DEFAULT} s): {seconds} s",
        ]
    return Grace(seconds, max(1, seconds - TORCHRUN_MARGIN), how)
