"""Stopping on purpose: signals and the STOP file, agreed on by every rank at chosen points.

Signal handlers only set a flag. Every train.check_every_steps steps, before every checkpoint
and at every epoch end, the ranks agree (one tiny all-reduce) on two flags: somebody asked to
stop, and somebody saw a non-finite loss. The hot path does no host synchronisation besides that.
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import torch

from launch.errors import EXIT_NONFINITE, EXIT_STOPPED, EXIT_USAGE
from launch.processes.dist import Runtime, all_reduce_sum


class Stopped(Exception):
    """Training stopped early on purpose; carries the exit code, a one-line message and the signals
    among its causes."""

    def __init__(self, message: str, code: int, signals: tuple = ()):
        super().__init__(message)
        self.code = code
        self.signals = tuple(signals)


class StopRequest:
    """A second signal of the same kind at least a second later exits at once. (Under torchrun a
    Ctrl-C reaches the workers twice within milliseconds: from the terminal and forwarded by the
    agent. That pair counts as one.)"""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    CAUSES = ("stop file", *(s.name for s in SIGNALS))  # the order of the agreement's cause counts

    def __init__(self, stop_file: Path):
        self.signum = 0
        self.first_at = 0.0
        self.stop_file = stop_file
        self.agreed = ""  # the causes every rank agreed on, for the stop's line
        self.agreed_signals: list[str] = []  # the signals among them
        self.guard = None  # rank 0: RunLock.still_ours, False once the run directory was replaced

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

    def causes(self) -> list[float]:
        """This rank's vote per cause: [stop file, SIGTERM, SIGINT, SIGUSR1]."""
        return [float(self.stop_file.exists()), *(float(self.signum == s) for s in self.SIGNALS)]

    def signals(self) -> list[str]:
        """The signals among the stop's causes: agreed on by the ranks, else this rank's own."""
        if self.agreed:
            return self.agreed_signals
        return [signal.Signals(self.signum).name] if self.signum else []

    def reason(self) -> str:
        if self.agreed:
            return self.agreed
        if self.signum:
            return signal.Signals(self.signum).name
        return f"stop file {self.stop_file}"

    def agree_on(self, counts: list[float], world_size: int) -> None:
        """Name the stop by what the ranks saw: 'SIGTERM (on 1 of 2 ranks)', never a cause nobody saw."""
        named = []
        self.agreed_signals = [cause for cause, n in zip(self.CAUSES, counts) if n > 0 and cause != "stop file"]
        for cause, n in zip(self.CAUSES, counts):
            if n > 0 and cause == "stop file":  # one file for the job: how many ranks saw it yet is timing, not news
                named.append(f"stop file {self.stop_file}")
            elif n > 0:
                named.append(cause if world_size == 1 or n == world_size else f"{cause} (on {int(n)} of {world_size} ranks)")
        self.agreed = " and ".join(named)


def agree(stop: StopRequest, loss_sum: torch.Tensor, rt: Runtime) -> tuple[bool, bool]:
    """All ranks learn whether anyone wants to stop (and why) and whether anyone's loss went
    non-finite. Flags are built on the device and read back once (one host sync). Alone, there is
    nobody to agree with: one read of the sum is the whole check."""
    lost = stop.guard is not None and not stop.guard()
    if rt.env.world_size == 1:
        if lost:
            raise lost_run_dir(stop.stop_file.parent)
        return stop.requested(), not math.isfinite(loss_sum.item())
    flags = torch.cat([(~torch.isfinite(loss_sum)).to(loss_sum.dtype).reshape(1), loss_sum.new_tensor([float(lost), *stop.causes()])])
    all_reduce_sum(flags, rt)
    nonfinite, gone, *counts = flags.tolist()
    if gone:
        raise lost_run_dir(stop.stop_file.parent)
    if any(counts):
        stop.agree_on(counts, rt.env.world_size)
    return any(counts), nonfinite > 0


def lost_run_dir(run_dir: Path) -> Stopped:
    """The run directory was removed or replaced under the job: stop without writing anything into the
    directory now at that path (another job's, maybe). All ranks raise it at the same agreement."""
    return Stopped(
        f"run directory {run_dir} was removed or replaced while this job ran (its .lock is gone or another file): "
        "stopped without writing into it; rerun the job in a run directory of its own",
        EXIT_USAGE,
    )


def nonfinite(cfg, step: int, epoch: int) -> Stopped:
    return Stopped(
        f"non-finite loss (NaN/inf) detected at step {step} (epoch {epoch}; checked every "
        f"{cfg.train.check_every_steps} steps); no checkpoint written after it, the last good one is kept: lower train.lr "
        "(or check the data) and rerun, which resumes from it with the new value",
        EXIT_NONFINITE,
    )


def restarted_by_kubernetes() -> bool:
    """In a Kubeflow TrainJob's pod (its torch runtime sets PET_NNODES; every pod has KUBERNETES_SERVICE_HOST)
    Kubernetes owns retries, not torchrun (`launch k8s` renders --max-restarts=0). A stop there must leave
    the container non-zero: exit 0 would count the pod as done (the Job never reruns it), and torchrun's
    agent would wait out its 300 s exit barrier for a peer pod that is gone."""
    return "PET_NNODES" in os.environ and "KUBERNETES_SERVICE_HOST" in os.environ


STOPPED = "STOPPED"  # in the run directory while the last run there stopped on purpose (removed when a run starts)


def stopped(stop: StopRequest, rt: Runtime, run_dir: Path, step: int, where: str) -> Stopped:
    """The agreed stop, after its checkpoint: the STOP file is consumed (a requeued job must not stop
    again at once) and STOPPED records it, so a caller that only sees exit 0 (torchrun) can tell a
    stop from a finish."""
    line = f"stopped by {stop.reason()} at step {step} ({where}); checkpoint saved, rerun the same command to resume"
    if rt.env.is_main:
        (run_dir / "STOP").unlink(missing_ok=True)
        (run_dir / STOPPED).write_text(line + "\n")
    return Stopped(line, EXIT_STOPPED, stop.signals())


FORWARDED = ("SIGTERM", "SIGINT")  # what torchrun's agent catches and passes on to its workers


def as_launcher_ends_it(e: Stopped, launcher: str, run_dir: Path) -> Stopped:
    """A stop on purpose with the exit code it takes under `launcher`, and its line saying what the job
    exits with. Measured (torch 2.13, Slurm 22.05; tests/test_stops.py): plain python, `--nproc` (the
    parent passes its workers' code on) and srun tasks (srun passes the highest on) exit 75. torchrun
    restarts a worker that exits non-zero (--max-restarts) or ends in a ChildFailedError, so there the
    workers exit 0, and torchrun exits 0 when only they were signalled (or saw the STOP file); when
    torchrun got SIGTERM or SIGINT itself (Ctrl-C at its terminal, `kill` of its pid, scancel of the
    step) it passes the signal on, waits for its workers and exits 1 with a SignalException. A worker
    cannot tell those two apart, so its line says both. (torchrun has no handler for SIGUSR1: sent to
    it, that signal kills it and its workers with it, nothing saved: send it to the workers, or use STOP.)"""
    if e.code != EXIT_STOPPED:
        return e
    if launcher != "torchrun":
        return Stopped(f"{e} (exit {EXIT_STOPPED})", EXIT_STOPPED, e.signals)
    if restarted_by_kubernetes():  # a TrainJob pod: Kubernetes, not torchrun, restarts it
        return Stopped(f"{e} (exit {EXIT_STOPPED}: in a Kubeflow TrainJob pod Kubernetes restarts the container, which resumes)", EXIT_STOPPED, e.signals)
    sent = [s for s in e.signals if s in FORWARDED]
    then = (f"; torchrun itself exits 1 if the {' or '.join(sent)} reached it, 0 if only its workers got it" if sent
            else ", and so does torchrun")
    return Stopped(f"{e} (the workers exit 0 under torchrun, which would restart them otherwise{then}; {run_dir / STOPPED} records the stop)", 0, e.signals)
