"""A collective that times out, or ranks that call different collectives: one line per rank, naming
the collective, its sequence number and the ranks that did not arrive, with the record kept.

torch's Flight Recorder (TORCH_FR_BUFFER_SIZE, set here unless the user set it) works on gloo in
torch 2.13: in C++, for every process group, it keeps the last collectives with their sequence
numbers, sizes and whether they finished. Nothing runs in Python per collective and nothing syncs
the host. When a collective times out, each rank (and each rank whose peer timed out: gloo closes
the timed-out rank's connections, so the peer sees 'Connection closed' first, see peer_timed_out):

1. writes the recorder's JSON dump to `<run dir>/hang/rank{r}.json` (torch's own format);
2. posts a summary of its last collectives to the rendezvous store and reads the other ranks'
   (EXCHANGE_S at most: a rank stuck outside any collective never posts);
3. prints one line: the collective that hung and its number, then the culprit: the first
   number at which the ranks called different collectives, else the ranks that never got there;
4. waits (EXCHANGE_S at most) until every rank has printed: torchrun and the --nproc parent take the
   job down at the first exit, which would cut the other ranks' lines.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

BUFFER_ENTRIES = "256"  # a few steps of DDP buckets, agreements and barriers; about 100 kB of C++ memory
EXCHANGE_S = 3.0  # below the --nproc parent's 5 s grace after the first exit
PEER_WAIT_S = 1.5  # how long a rank whose peer closed the connection looks for a timeout mark
_KEEP = 48  # entries each rank posts to the store


def enable_flight_recorder() -> None:
    """Before the process group exists (the recorder reads the variable when it starts)."""
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", BUFFER_ENTRIES)


def is_timeout(exc: BaseException) -> bool:
    """A collective that did not complete in time (gloo: 'Timed out waiting 5000ms for recv ...')."""
    return "Timed out waiting" in str(exc)


def peer_timed_out(rt, wait_s: float = PEER_WAIT_S) -> bool:
    """Did another rank's collective time out? gloo closes the timed-out rank's connections, so
    its peers see 'Connection closed by peer' instead of a timeout of their own; the timed-out
    rank marks the store before anything else (`report`), within milliseconds. Only a collective
    of ours that has waited half the timeout can be part of a hang (the peer waited in its own for
    the whole timeout, and the two were called about together); a crash of the peer mid-step meets
    a fresh one and is told at once, without looking for the mark."""
    if rt.store is None or not _waited_long(flight_record()):
        return False
    deadline = time.monotonic() + wait_s
    try:
        while not rt.store.check(["hang/started"]):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
    except Exception:  # the store's host is gone too: a dead peer, not a hang
        return False
    return True


def _waited_long(record: dict) -> bool:
    """Had this rank's last collective waited at least half its timeout? True without a record."""
    entries = record.get("entries")
    if not entries:
        return True
    last = entries[-1]
    waited_ms = (time.time_ns() - int(last.get("time_created_ns", 0))) / 1e6
    return waited_ms >= 0.5 * float(last.get("timeout_ms", 0))


def flight_record() -> dict:
    """The recorder's dump, or {} when it is off (TORCH_FR_BUFFER_SIZE=0) or this torch lacks it."""
    try:
        from torch._C._distributed_c10d import _dump_fr_trace_json

        return json.loads(_dump_fr_trace_json(True, False))
    except Exception:
        return {}


def summary(record: dict) -> list[dict]:
    """The last entries, reduced to what the line needs: group, number, op, sizes, finished."""
    out = []
    for e in record.get("entries", [])[-_KEEP:]:
        group = e.get("process_group") or ["?", "?"]
        op = str(e.get("profiling_name", "?")).split(":")[-1]
        out.append({"pg": group[1] or group[0], "seq": int(e.get("collective_seq_id", 0)), "op": op,
                    "sizes": e.get("input_sizes", []), "done": bool(e.get("retired")), "timeout_ms": e.get("timeout_ms", 0)})
    return out


def _name(entry: dict) -> str:
    sizes = entry["sizes"]
    shown = f" {sizes[0] if len(sizes) == 1 else sizes}" if sizes else ""
    group = "" if entry["pg"] == "default_pg" else f" in group {entry['pg']}"
    return f"{entry['op']}{shown}{group}"


def describe(rank: int, mine: list[dict], others: dict[int, list[dict] | None]) -> str:
    """The line, from this rank's entries and the other ranks' (None: that rank did not post)."""
    if not mine:
        return f"rank {rank}: a collective timed out (no flight record: TORCH_FR_BUFFER_SIZE is 0); see the other ranks' lines"
    last = mine[-1]
    head = f"rank {rank}: collective #{last['seq']} {_name(last)} did not complete within the {last['timeout_ms'] / 1000:g} s timeout"
    first = None  # (seq, other rank, its entry, my entry): the earliest number where the ops differ
    for r, theirs in sorted(others.items()):
        by_seq = {(e["pg"], e["seq"]): e for e in theirs or []}
        for e in mine:
            t = by_seq.get((e["pg"], e["seq"]))
            if t is not None and (t["op"], t["sizes"]) != (e["op"], e["sizes"]) and (first is None or e["seq"] < first[0]):
                first = (e["seq"], r, t, e)
                break
    if first is not None:
        seq, r, t, e = first
        return (f"{head}: the ranks called different collectives: #{seq} is {_name(e)} on rank {rank} but {_name(t)} on rank {r} "
                "(every rank must call the same collectives in the same order)")
    late = []
    for r, theirs in sorted(others.items()):
        reached = [e["seq"] for e in theirs or [] if e["pg"] == last["pg"]]
        if theirs is None:
            late.append(f"rank {r} (no answer: stuck outside a collective, or gone)")
        elif not reached or max(reached) < last["seq"]:
            late.append(f"rank {r} (its last: #{max(reached)})" if reached else f"rank {r} (no collective yet)")
    if late:
        return f"{head}: did not arrive: {', '.join(late)}"
    return f"{head}: every rank reached it (a stalled transport, not a mismatch)"


def report(rt, run_dir: Path, exc: BaseException) -> str:
    """Dump, trade summaries, return this rank's line (without 'error: ')."""
    rank, world = rt.env.rank, rt.env.world_size
    _mark(rt.store)
    record = flight_record()
    mine = summary(record)
    where = Path(run_dir) / "hang" / f"rank{rank}.json"
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_text(json.dumps(record or {"error": str(exc)}, indent=1))
        kept = f"; flight record in {where}"
    except OSError as e:
        kept = f"; could not keep the flight record ({e.strerror})"
    others = _trade(rt.store, rank, world, mine)
    return describe(rank, mine, others) + kept


def _trade(store, rank: int, world: int, mine: list[dict]) -> dict[int, list[dict] | None]:
    """Post this rank's summary, read the others' until EXCHANGE_S; a missing one is None."""
    others: dict[int, list[dict] | None] = {r: None for r in range(world) if r != rank}
    if store is None:
        return others
    deadline = time.monotonic() + EXCHANGE_S
    try:
        store.set(f"hang/rank{rank}", json.dumps(mine))
        while time.monotonic() < deadline and any(v is None for v in others.values()):
            for r in [r for r, v in others.items() if v is None]:
                if store.check([f"hang/rank{r}"]):
                    others[r] = json.loads(store.get(f"hang/rank{r}"))
            time.sleep(0.05)
    except Exception:  # the store's host is gone: say what this rank knows
        pass
    return others


def _mark(store) -> None:
    try:
        if store is not None:
            store.set("hang/started", "1")
    except Exception:
        pass


def finish(rt) -> None:
    """Wait (EXCHANGE_S at most) until every rank has printed its line, then let the caller exit."""
    if rt.store is None:
        return
    deadline = time.monotonic() + EXCHANGE_S
    try:
        printed = rt.store.add("hang/printed", 1)
        while printed < rt.env.world_size and time.monotonic() < deadline:
            time.sleep(0.05)
            printed = rt.store.add("hang/printed", 0)
    except Exception:
        pass
