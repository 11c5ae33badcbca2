"""Streams: an IterableDataset (no length needed) fed in one global order, so DDP equals one process.

Every rank reads the whole stream and keeps its share, exactly as the map-style order deals a
permutation: an optimizer step takes the next accum_steps x world_size x batch_size items, micro-step
m of it the m-th block of world_size x batch_size, and rank r every world_size-th item of a block from
r on. One process at batch k*b therefore sees the same items in each step as k ranks at batch b. When
the stream ends, the short last step is dealt the same way (a rank with no item runs a zero-weight
stand-in), and the epoch ends; `set_epoch(epoch)` is called first if the dataset has it.

Item i of epoch e is read right after seeding the CPU generators with (train.seed, e, i), so random
choices inside the stream's iterator are a function of the position (launch.data.seeding).

The position (items consumed in the epoch) is the resume point. A stream with `state_dict()` and
`load_state_dict()` is restored from the state taken after the last consumed step (no replay);
any other stream is replayed from the epoch's start and the consumed items skipped.

With data.num_workers=W, worker w builds steps w, w+W, ... (each worker reads the stream and skips
the other steps' items); the DataLoader hands them over in order. The stream's own code sees no
worker (get_worker_info() is None there), so one that splits itself by worker reads it all too.

A stream that can split itself by rank says so with `shard(rank=, world_size=)`, returning the
stream of items rank, rank + world_size, ... : then each rank reads only its share
(launch.data.stream_shards).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Optional

import torch
from torch.utils.data import IterableDataset, get_worker_info
from torch.utils.data._utils import worker as _worker
from torch.utils.data._utils.collate import default_collate

from launch.data.loader import collate_fn, data_loader
from launch.data.seeding import EVAL_EPOCH
from launch.data.stream_shards import shard_of, sharded_steps
from launch.data.types import Split, Step, split_item, tree_map
from launch.errors import UserError
from launch.train.randomness import mix, preserved, seed_cpu


@contextlib.contextmanager
def _one_process():
    """Inside the stream's own code, get_worker_info() is None: a stream that splits itself across
    DataLoader workers (PyTorch's IterableDataset docs, Hugging Face's IterableDataset) reads the
    whole stream in each worker, as with data.num_workers=0, and the steps are dealt to the workers
    here. Without this, each worker read half and dropped the other workers' steps: half the data lost."""
    saved = _worker._worker_info
    _worker._worker_info = None
    try:
        yield
    finally:
        _worker._worker_info = saved


def _reader(dataset, seed: int, epoch: int, seed_samples: bool, state=None, first: int = 0, place=None):
    """Yields (position, item) from the start of the epoch's pass, or from `state` at position `first`.
    `place` maps the count of items read to their position in the whole stream (a shard's items)."""
    in_worker = get_worker_info() is not None
    with _one_process():
        if hasattr(dataset, "set_epoch") and epoch >= 0:  # not for evaluation (EVAL_EPOCH): datasets' streams seed with it
            dataset.set_epoch(epoch)
        if state is not None:
            dataset.load_state_dict(state)
        it = iter(dataset)
    count = first
    while True:
        pos = place(count) if place is not None else count
        try:
            with _one_process():
                if not seed_samples:
                    item = next(it)
                elif in_worker:
                    seed_cpu(mix(seed, epoch, pos))
                    item = next(it)
                else:
                    with preserved():
                        seed_cpu(mix(seed, epoch, pos))
                        item = next(it)
        except StopIteration:
            return
        yield pos, item
        count += 1


class _Steps(IterableDataset):
    """This rank's optimizer steps of one epoch, built where the stream is read (worker or main process)."""

    def __init__(self, dataset, spec: dict):
        self.dataset, self.spec = dataset, spec

    def _stream_state(self) -> Optional[dict]:
        # a copy: a stream may hand out its live dict and keep mutating it
        return copy.deepcopy(self.dataset.state_dict()) if self.spec["stateful"] else None

    def __iter__(self):
        s = self.spec
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        k, b, start = s["world_size"], s["batch_size"], s["start"]
        restored = s["state"] is not None and start > 0
        reader = _reader(self.dataset, s["seed"], s["epoch"], s["seed_samples"], s["state"] if restored else None, start if restored else 0)
        if not restored:  # replay: read and drop what the epoch already consumed
            for _ in range(start):
                if next(reader, None) is None:
                    return
        per_step, index, read = s["accum"] * k * b, 0, 0
        pending = next(reader, None)
        while pending is not None:
            items = [pending[1]]
            while len(items) < per_step and (nxt := next(reader, None)) is not None:
                items.append(nxt[1])
            read += len(items)
            state = self._stream_state()  # after the step's items, before the look-ahead
            pending = next(reader, None)
            if index % workers == worker:
                yield self._packet(items, start + read, pending is None, state)
            index += 1

    def _packet(self, items: list, position: int, last: bool, state) -> dict:
        s = self.spec
        k, b, rank = s["world_size"], s["batch_size"], s["rank"]
        collate = s["collate"] or default_collate
        micro, mine = [], 0
        for at in range(0, len(items), k * b):
            block = items[at : at + k * b]
            share = block[rank::k]
            n = len(share)
            micro.append((collate(share if n else block[:1]), n))
            mine += n
        return {"micro": micro, "global": len(items), "position": position, "mine": mine, "last": last, "state": state}


class _EvalShare(IterableDataset):
    """This rank's evaluation items (positions rank, rank + k, ...), batched; worker w takes batches w, w+W, ..."""

    def __init__(self, dataset, spec: dict):
        self.dataset, self.spec = dataset, spec

    def __iter__(self):
        s = self.spec
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        collate = s["collate"] or default_collate
        batch, index, limit = [], 0, s["limit"]
        k, rank = s["world_size"], s["rank"]
        place = (lambda t: rank + k * t) if s.get("sharded") else None  # a shard's items: positions rank, rank + k, ...
        for pos, item in _reader(self.dataset, s["seed"], EVAL_EPOCH, s["seed_samples"], place=place):
            if limit and pos >= limit:
                break
            if pos % s["world_size"] == s["rank"]:
                batch.append(item)
                if len(batch) == s["batch_size"]:
                    if index % workers == worker:
                        yield collate(batch)
                    batch, index = [], index + 1
        if batch and index % workers == worker:
            yield collate(batch)


class StreamFeeder:
    """The Feeder interface (launch.data.feeder) for an IterableDataset."""

    in_memory = False
    counted = True  # False: a copy of another rank's share (launch.data.feeder.make_feeder)

    def __init__(self, split: Split, cfg, device: torch.device, rank: int, world_size: int, batch_size: int):
        self.dataset, self.cfg, self.device = split.dataset, cfg, device
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.where = f"data.name '{cfg.data.name}'"
        self.stateful = callable(getattr(self.dataset, "state_dict", None)) and callable(getattr(self.dataset, "load_state_dict", None))
        self.part = shard_of(self.dataset, rank, world_size, self.where, cfg.log.debug)  # this rank's shard, if the stream splits itself
        if self.part is not None:
            self.stateful = False  # each rank's shard has its own state: replayed instead (launch.data.stream_shards)
        self.state = None  # the stream's state after the last consumed step (stateful streams)

    def _spec(self, **extra) -> dict:
        c = self.cfg
        return {"seed": c.train.seed, "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size,
                "seed_samples": c.data.seed_samples and getattr(self.dataset, "needs_sample_seeds", True), "collate": collate_fn(c), **extra}

    def _to_device(self, batch):
        inputs, target = split_item(batch, self.where)
        move = lambda t: t.to(self.device, non_blocking=True)  # noqa: E731
        return tree_map(move, inputs), move(target)

    def steps_per_epoch(self, accum: int):
        return None

    def steps_left(self, start: int, accum: int):
        return None

    def epoch_steps(self, seed: int, epoch: int, start: int, accum: int, as_indices: bool = False) -> Iterator[Step]:
        if self.part is not None:
            yield from sharded_steps(self, self.part, self._spec(epoch=epoch, start=start, accum=accum), accum, _reader)
            return
        spec = self._spec(epoch=epoch, start=start, accum=accum, stateful=self.stateful, state=self.state if start else None)
        for packet in data_loader(_Steps(self.dataset, spec), self.cfg, self.rank, self.device):
            self.state = packet["state"]
            batches = iter([(*self._to_device(batch), n) for batch, n in packet["micro"]])
            yield Step(batches, len(packet["micro"]), packet["global"], packet["position"], packet["mine"] if self.counted else 0, packet["last"])

    def eval_batches(self) -> Iterator[tuple]:
        spec = self._spec(limit=self.cfg.data.eval_max_samples, sharded=self.part is not None)
        source = self.dataset if self.part is None else self.part
        for batch in data_loader(_EvalShare(source, spec), self.cfg, self.rank, self.device):
            yield self._to_device(batch)

    def sample_batch(self, size: int = 4):
        items = []
        with preserved():
            for _, item in _reader(self.dataset, self.cfg.train.seed, EVAL_EPOCH, False):
                items.append(item)
                if len(items) == size:
                    break
        if not items:
            raise UserError(f"{self.where}: the stream yielded no item")
        return self._to_device((collate_fn(self.cfg) or default_collate)(items))
