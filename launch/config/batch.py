"""The global batch at a world size: train.global_batch split into a per-process micro-batch and
accumulation steps, so a run requeued on fewer or more processes takes the same optimizer steps.

An optimizer step always covers the next global-batch samples of the one epoch order
(launch.data.order), whatever the split; only how they are grouped into micro-batches (and so the
summation order) changes with it.
"""

from __future__ import annotations

from launch.errors import UserError


def split(global_batch: int, world_size: int, max_micro: int) -> tuple[int, int]:
    """(per-process micro-batch, accumulation steps) with the fewest accumulation steps whose
    micro-batch is at most `max_micro` (data.batch_size, the memory limit)."""
    if global_batch % world_size:
        raise UserError(
            f"train.global_batch={global_batch} does not divide over {world_size} processes "
            f"(each process must take the same number of samples; e.g. {global_batch - global_batch % world_size or world_size})"
        )
    share = global_batch // world_size
    for accum in range(1, share + 1):
        if share % accum == 0 and share // accum <= max_micro:
            return share // accum, accum
    raise AssertionError("unreachable: accum = share gives micro-batches of 1")


def resolve(cfg, world_size: int, tp: int = 1) -> str:
    """With train.global_batch set: put the split into data.batch_size and train.accum_steps (in this
    process's config; config.yaml records them) and return the line that says so; else ''.
    `world_size` counts the data-parallel processes: under dist.tp=T the T ranks of a tensor-parallel
    group take the same samples, so a global batch is split world / T ways."""
    g = cfg.train.global_batch
    if not g:
        return ""
    if cfg.train.accum_steps != 1:
        raise UserError("train.global_batch and train.accum_steps: set one (the accumulation steps follow from the global batch)")
    micro, accum = split(g, world_size, cfg.data.batch_size)
    cap = cfg.data.batch_size
    cfg.data.batch_size, cfg.train.accum_steps = micro, accum
    over = f"{world_size} data-parallel group(s) of {tp} (dist.tp={tp})" if tp > 1 else f"{world_size} process(es)"
    return (
        f"train.global_batch={g} over {over}: {micro} per process x {accum} accumulation step(s) "
        f"(data.batch_size={cap} is the largest micro-batch)"
    )


def describe(batch_size: int, world_size: int, accum: int) -> str:
    return f"{batch_size * world_size * accum} ({batch_size} per process x {world_size} process(es) x {accum} accumulation step(s))"
