"""The tracker relay: `python -m launch.observe.trackers.relay RUN_DIR`, started and fed by rank 0 (launch.observe.trackers.pipe).

It reads JSON lines from stdin: {"open": {names, meta}} first, then on a resume {"catch_up": step}
(metrics.jsonl is final up to that step: the relay reads it from there), {"record": ...} per new
metrics.jsonl record, and {"end": model_path} when the run finished. The end of stdin, whichever way
rank 0 left, finishes every tracker run: 'finished' after "end", 'stopped' if rank 0 left a STOPPED file (a stop
on purpose: the rerun continues), else 'failed'. SIGINT and SIGTERM are ignored (a Ctrl-C or a
preemption signal reaches the whole job; the relay still has to finish what rank 0 sent), and the
finish gets FINISH_S seconds at most.

<run dir>/trackers.json keeps, per tracker, what names its run and the last step logged to it with the
fields logged at that step: a record at an earlier step is not logged again, and at the same step only
fields that step lacks (metrics.jsonl may hold a step record and an epoch record at one step); a
tracker that keeps data only at its finish (W&B) has its step kept only then. On a resume the relay
hands every tracker metrics.jsonl's records up to the resumed step, each taking what it lacks, so a
tracker that failed, was killed or is new catches up, and so does one whose run had to be started
anew (its store lost the run: `open` returned another id, and its saved progress is dropped). One
relay per run directory at a time: a rerun's relay waits for the previous one's finish
(.trackers.lock), so trackers.json is final when it is read.
What the trackers' own libraries print goes to <run dir>/trackers.log; the relay says one line per
tracker when its run opens and one line if it fails, after which it gets nothing more from this job.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Optional

from launch.checkpoint import integrity
from launch.observe.trackers import STATE, STOPPED, _short, load, numbers

FINISH_S = 120
LOCK = ".trackers.lock"
LOG = "trackers.log"
METRICS = "metrics.jsonl"


class Book:
    """trackers.json, written whole (temporary name, fsync, rename) whenever a tracker's state is kept."""

    def __init__(self, run_dir: Path, out=None):
        self.path = Path(run_dir) / STATE
        self.data: dict = {}
        if self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except (OSError, ValueError) as e:  # unreadable: set aside, never dropped; the trackers start new runs
                kept = integrity.set_aside(self.path, "unreadable")
                if out is not None:
                    print(f"trackers: {self.path} was unreadable ({_short(e, 80)}), kept as {kept.name if kept else '?'}: "
                          "new tracker runs, caught up from metrics.jsonl", file=out, flush=True)
            if not isinstance(self.data, dict):
                self.data = {}

    def keep(self, name: str, state: dict) -> None:
        self.data[name] = dict(state)
        integrity.atomic_write_text(self.path, json.dumps(self.data, indent=1, sort_keys=True) + "\n", what="tracker state")


class Feed:
    """One tracker: steps never logged twice nor backwards, its state kept, one warning if it fails.
    A tracker whose data is safe only once its run is finished (W&B: `durable_at_finish`) has its
    progress kept only then, so after a relay that was killed the next one logs those records again."""

    def __init__(self, name: str, tracker, book: Book, err):
        self.name, self.tracker, self.book, self.err = name, tracker, book, err
        self.state = dict(book.data.get(name) or {})
        self.at_finish = bool(getattr(tracker, "durable_at_finish", False))
        self.alive = True

    def open(self, out) -> None:
        try:
            ident = self.tracker.open(dict(self.state)) or {}
            if self.state.get("id") and ident.get("id", self.state["id"]) != self.state["id"]:
                self.state = {}  # a new run (the saved one is gone): nothing is logged to it yet
            self.state.update(ident)
            self.state["status"] = "running"
            self.book.keep(self.name, self.state)
        except Exception as e:  # noqa: BLE001 - any failure of a tracker is its own, never the training's
            return self.fail(e, "while opening its run")
        where = getattr(self.tracker, "where", "")
        if where:
            at = f", continuing after step {self.state['step']}" if "step" in self.state else ""
            print(f"{self.name}: {where}{at}", file=out, flush=True)

    def record(self, step: int, values: dict) -> None:
        last = self.state.get("step")
        if not self.alive or (last is not None and step < last):
            return
        logged = set(self.state.get("keys", [])) if step == last else set()
        values = {k: v for k, v in values.items() if k not in logged}
        if not values:
            return
        try:
            extra = self.tracker.log(step, values)
            self.state.update(extra or {}, step=step, keys=sorted(logged | set(values)))
            if not self.at_finish:
                self.book.keep(self.name, self.state)
        except Exception as e:  # noqa: BLE001
            self.fail(e, f"at step {step}")

    def finish(self, status: str, model: Optional[str]) -> None:
        if not self.alive:
            return
        try:
            self.tracker.finish(status, model)
            self.state.update({"status": status, **({"model": model} if model else {})})
            self.book.keep(self.name, self.state)
        except Exception as e:  # noqa: BLE001
            self.fail(e, "while finishing its run")

    def fail(self, e: BaseException, when: str) -> None:
        self.alive = False
        print(f"warning: tracker {self.name} failed {when} ({type(e).__name__}: {_short(e)}); it gets no more records "
              f"from this job (metrics.jsonl has them all; a rerun catches it up from there)", file=self.err, flush=True)


def _streams(run_dir: Path):
    """(stdout, stderr) of our own; fds 1 and 2 then go to trackers.log, for whatever W&B, MLflow,
    alembic or a warning print, so the job's output holds only the relay's own lines."""
    out, err = os.fdopen(os.dup(1), "w"), os.fdopen(os.dup(2), "w")
    try:
        fd = os.open(run_dir / LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError:
        fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return out, err


def _lock(run_dir: Path) -> int:
    """Wait for a previous relay in this run directory to finish (its trackers.json is final then)."""
    import fcntl

    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def serve(run_dir: Path, lines, out, err) -> None:
    """Open the trackers named by the first line, feed them every record, finish them at the end of `lines`."""
    first = json.loads(next(lines, "") or "{}").get("open") or {}
    book = Book(run_dir, out)
    feeds = []
    for name in first.get("names", []):
        try:
            feed = Feed(name, load(name)(run_dir, first["meta"]), book, err)
        except Exception as e:  # noqa: BLE001 - checked at start on every rank; a change since is this tracker's failure
            Feed(name, None, book, err).fail(e, "to load")
            continue
        feed.open(out)
        feeds.append(feed)
    status, model = "failed", None
    for line in lines:
        try:
            msg = json.loads(line)
        except ValueError:  # the torn end of a write cut short when rank 0 died
            continue
        if "end" in msg:
            status, model = "finished", msg["end"]
        for record in _records(run_dir, msg):
            step, values = numbers(record)
            for feed in feeds:
                feed.record(step, values)
    if status != "finished" and (run_dir / STOPPED).exists():
        status = "stopped"
    for feed in feeds:
        feed.finish(status, model)


def _records(run_dir: Path, msg: dict) -> list[dict]:
    """What a message hands the trackers: a new record, or on a resume the records it already has."""
    if "record" in msg:
        return [msg["record"]]
    return _kept(run_dir, msg["catch_up"]) if "catch_up" in msg else []


def _kept(run_dir: Path, upto: int) -> list[dict]:
    """metrics.jsonl's records up to step `upto` (rank 0 truncated it there before saying so; what it
    appends since comes through the pipe); a torn line is skipped, as everywhere."""
    try:
        raw = (run_dir / METRICS).read_bytes()
    except OSError:
        return []
    out = []
    for line in raw.split(b"\n"):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= upto:
            out.append(rec)
    return out


def main(argv: list[str]) -> int:
    run_dir = Path(argv[1])
    out, err = _streams(run_dir)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    _lock(run_dir)

    def late(signum, frame):
        print(f"warning: trackers: their runs did not finish within {FINISH_S} s; left as they are", file=err, flush=True)
        os._exit(1)

    signal.signal(signal.SIGALRM, late)
    lines = iter(sys.stdin)

    def until_end():
        yield from lines
        signal.alarm(FINISH_S)  # rank 0 is gone: the finish is all that is left

    serve(run_dir, until_end(), out, err)
    out.flush()
    err.flush()
    return 0  # a normal exit: W&B's exit hook stops its service process


if __name__ == "__main__":
    sys.exit(main(sys.argv))
