"""The DataLoader both feeders use, and data.collate."""

from __future__ import annotations

import functools
import os
import sys

import torch
from torch.utils.data import DataLoader

from launch.processes import lifeline
from launch.user_code import import_object


def collate_fn(cfg, dataset=None):
    """data.collate: a user's function from a list of items to a batch; else the dataset's own `collate`
    method, if it has one (padding rows: launch.data.sft); else torch's default_collate (None)."""
    if cfg.data.collate:
        return import_object(cfg.data.collate, "data.collate", cfg.log.debug)
    inner = getattr(dataset, "dataset", dataset)  # under launch.data.seeding's wrappers
    return getattr(inner, "collate", None)


def data_loader(dataset, cfg, rank: int, device: torch.device, batch_sampler=None) -> DataLoader:
    """A DataLoader over map-style keys (with `batch_sampler`) or over a stream's ready-made steps (without)."""
    pin = cfg.data.pin_memory == "true" or (cfg.data.pin_memory == "auto" and device.type == "cuda")
    workers = cfg.data.num_workers
    return DataLoader(
        dataset,
        **({"batch_sampler": batch_sampler, "collate_fn": collate_fn(cfg, dataset)} if batch_sampler is not None else {"batch_size": None}),
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0 and batch_sampler is not None,  # a stream gets a new loader per epoch
        prefetch_factor=2 if workers > 0 else None,
        # Whatever the default start method (spawn on macOS, forkserver from Python 3.14), a worker that
        # started afresh would import torch and the user's module again (seconds each): fork, on Linux.
        multiprocessing_context="fork" if workers > 0 and sys.platform.startswith("linux") else None,
        worker_init_fn=functools.partial(lifeline.loader_worker_dies_with, os.getpid()) if workers > 0 else None,
        generator=torch.Generator().manual_seed(cfg.train.seed * 1000 + rank),  # distinct worker seeds per rank
    )
