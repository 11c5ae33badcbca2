"""Fault injection for tests: the real failure paths, triggered at a chosen step.

LAUNCH_FAULT holds ';'-separated items `kind:key=value:...`, for example
`raise:step=3:rank=1` or `kill:step=5:rank=1:attempt=0`. Kinds:
- raise: raise RuntimeError (an ordinary crash on one rank);
- kill: SIGKILL this process (a dead node);
- nan: make this step's loss NaN;
- stop: request a stop, as SIGTERM would;
- stall_save: sleep `seconds` between writing a checkpoint and renaming it (kill the writer there);
- mismatch: call one extra collective (a barrier) before the step, as a model that calls a
  collective on some ranks only would: from there on the ranks' collectives no longer pair up and
  the job hangs until dist.timeout_s (see launch.processes.hangs). (An extra all_reduce whose size differs
  from the peer's is no hang: gloo aborts the process with its own "collective mismatch" message.)
`rank` (default any) and `attempt` (TORCHELASTIC_RESTART_COUNT, default any) narrow an item.
With LAUNCH_FAULT_MARK=PATH, raise, kill and mismatch first write the time (time.time()) to PATH, so a test
can measure how fast the job goes down from the failure itself, not from the launch.
Unset in normal runs: then every check is a dictionary lookup on an empty dict.
"""

from __future__ import annotations

import os
import signal
import time

from launch.errors import UserError

KINDS = ("raise", "kill", "nan", "stop", "stall_save", "mismatch")


class Faults:
    def __init__(self, spec: str, rank: int, attempt: int):
        self.by_step: dict[int, list[dict]] = {}
        for item in filter(None, (s.strip() for s in spec.split(";"))):
            kind, *pairs = item.split(":")
            if kind not in KINDS:
                raise UserError(f"LAUNCH_FAULT: unknown fault '{kind}' (one of {', '.join(KINDS)})")
            opts = dict(p.split("=", 1) for p in pairs)
            if int(opts.get("rank", rank)) != rank or int(opts.get("attempt", attempt)) != attempt:
                continue
            self.by_step.setdefault(int(opts.get("step", 0)), []).append({"kind": kind, **opts})

    @classmethod
    def from_env(cls, rank: int, attempt: int) -> "Faults":
        return cls(os.environ.get("LAUNCH_FAULT", ""), rank, attempt)

    def kinds_at(self, step: int) -> list[dict]:
        return self.by_step.get(step, []) if self.by_step else []

    def before_step(self, step: int) -> bool:
        """Run crash faults for `step`; return True if this step's loss must be NaN."""
        nan = False
        for f in self.kinds_at(step):
            if f["kind"] in ("raise", "kill", "mismatch") and os.environ.get("LAUNCH_FAULT_MARK"):
                with open(os.environ["LAUNCH_FAULT_MARK"], "w") as mark:
                    mark.write(repr(time.time()))
            if f["kind"] == "raise":
                raise RuntimeError(f"injected failure at step {step} (LAUNCH_FAULT)")
            if f["kind"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if f["kind"] == "mismatch":
                import torch.distributed as dist

                dist.barrier()
            nan |= f["kind"] == "nan"
        return nan

    def stop_after(self, step: int) -> bool:
        return any(f["kind"] == "stop" for f in self.kinds_at(step))

    def save_stall(self, step: int):
        for f in self.kinds_at(step):
            if f["kind"] == "stall_save":
                seconds = float(f.get("seconds", 60))
                return lambda: time.sleep(seconds)
        return None
