"""Rank 0's end of the tracker relay (launch.observe.trackers.relay): start it, hand it records without ever
blocking a training step, end it and wait for its finish."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import launch
from launch.observe.trackers import _short
from launch.observe.trackers.relay import FINISH_S
from launch.processes import lifeline

PIPE_BYTES = 1 << 20  # the pipe's buffer (Linux grows it on request): thousands of records
MAX_BACKLOG = 64 << 20  # records held here while the relay is behind, before giving it up


class Relay:
    def __init__(self, run_dir: Path, names: list[str], meta: dict):
        self.run_dir, self.names = Path(run_dir), names
        self.backlog = bytearray()
        self.proc = None
        # The relay imports launch from where this process did, and user trackers as this process would.
        path = [str(Path(launch.__file__).resolve().parent.parent), sys.path[0], os.environ.get("PYTHONPATH", "")]
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "launch.observe.trackers.relay", str(self.run_dir)], stdin=subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)},
                start_new_session=True,  # a Ctrl-C at the terminal is for the job; the relay finishes after it
            )
        except OSError as e:
            self._give_up(f"could not start ({_short(e)})")
            return
        self.fd = self.proc.stdin.fileno()
        lifeline.parent_only(self.fd)  # a forked DataLoader worker must not hold the pipe open
        try:
            import fcntl

            fcntl.fcntl(self.fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
        except OSError:
            pass  # the default 64 KiB still holds a few hundred records
        os.set_blocking(self.fd, False)
        self.send({"open": {"names": names, "meta": meta}})

    def send(self, msg: dict) -> None:
        if self.proc is None:
            return
        self.backlog += (json.dumps(msg) + "\n").encode()
        self._drain()
        if len(self.backlog) > MAX_BACKLOG:
            self._give_up(f"is {len(self.backlog) >> 20} MiB of records behind")

    def catch_up(self, step: int) -> None:
        """On a resume, once metrics.jsonl holds just the records up to `step`: the relay reads them
        there and hands each tracker what it lacks (nothing to one that is up to date; all of them to
        one added since, or whose run its store lost). It decides, not this process: it reads
        trackers.json after the previous relay's finish and knows which runs had to start anew."""
        self.send({"catch_up": int(step)})

    def close(self, model: Optional[str], wait: bool) -> None:
        """The rest of the records and the end (model: model.pt's path when the run finished; None
        ends the relay's input only); with `wait`, until the relay finished the trackers' runs."""
        if self.proc is None:
            return
        if model is not None:
            self.send({"end": model})
        deadline = time.monotonic() + (FINISH_S + 10 if wait else 0)
        while self.proc is not None and self.backlog and time.monotonic() < deadline:
            select.select([], [self.fd], [], 1.0)
            self._drain()
        if self.proc is None:
            return
        lifeline.forget(self.fd)
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        if wait:
            try:
                self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"warning: trackers: the relay (pid {self.proc.pid}) is still finishing {', '.join(self.names)}; it goes on in the background", file=sys.stderr, flush=True)
        self.proc = None

    def abandon(self) -> None:
        """Stop the relay where it is (the run directory was replaced under the job)."""
        if self.proc is not None:
            lifeline.forget(self.fd)
            self.proc.kill()
            self.proc = None

    def _drain(self) -> None:
        try:
            while self.backlog:
                del self.backlog[: os.write(self.fd, self.backlog)]
        except BlockingIOError:
            pass  # the relay is behind: the rest waits here, the step goes on
        except OSError as e:
            self._give_up(f"is gone ({_short(e)})")

    def _give_up(self, why: str) -> None:
        print(f"warning: trackers: the relay for {', '.join(self.names)} {why}; they get no more records from this job "
              "(metrics.jsonl has them all; a rerun catches them up from there)", file=sys.stderr, flush=True)
        if self.proc is not None:
            lifeline.forget(self.fd)
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        self.proc = None
        self.backlog.clear()
