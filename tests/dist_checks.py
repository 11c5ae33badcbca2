"""Checks that need a real gloo process group, run in spawned workers.

`run_checks(world_size, out_dir)` spawns world_size processes; each builds the real Runtime
through launch.processes.dist.setup, then records this rank's sampler shards and the exact evaluation
result into out_dir/rank{r}.pt for the test to compare.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import forked

N_TRAIN = 10  # deliberately not divisible by 3
N_EVAL = 10
N_SEQ = 11  # divisible by none of the world sizes 2, 3


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LAUNCH_LAUNCHER="spawn", LAUNCH_STORE_HOSTED="1",
    )
    torch.set_num_threads(1)
    from launch import config
    from launch.data.feeder import Feeder
    from launch.data.order import rank_train_indices
    from launch.data.types import Split
    from launch.models.build import NeuralNetwork
    from launch.processes import dist as dist_mod
    from launch.train.evaluate import evaluate
    from launch.train.task import Task

    cfg = config.load(None, ["data.eval_batch_size=3", "train.device=cpu", "data.batch_size=2"])
    env = dist_mod.detect()
    rt = dist_mod.setup(cfg, env)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N_EVAL, 4, generator=g)
    y = torch.randint(0, 3, (N_EVAL,), generator=g)
    feeder = Feeder(Split(x, y), cfg, rt.device, env.rank, env.world_size, cfg.data.eval_batch_size)
    torch.manual_seed(0)
    model = NeuralNetwork(4, [8], 3)
    ev = evaluate(model, Task(cfg, model), feeder, rt, cfg)
    loss, acc, count = ev["eval_loss"], ev["eval_accuracy"], ev["eval_samples"]
    shards = {e: rank_train_indices(N_TRAIN, 0, e, env.rank, env.world_size).tolist() for e in range(3)}
    train_feed = Feeder(Split(torch.arange(N_TRAIN).float()[:, None], torch.arange(N_TRAIN)), cfg, rt.device, env.rank, env.world_size, 2)
    batches = [yb.tolist()[:n] for _, yb, n in train_feed.train_epoch(0, 1)]
    # A sequence task: 11 sequences (divisible by none of 2, 3), token-weighted with ignored targets.
    from tests.user_code import SeqGRU, Tokens

    seq = Tokens("eval", n=N_SEQ)
    torch.manual_seed(0)
    gru = SeqGRU()
    seq_cfg = config.load(None, ["data.eval_batch_size=2", "train.device=cpu"])
    ev = evaluate(gru, Task(seq_cfg, gru), Feeder(Split(seq.x, seq.y), seq_cfg, rt.device, env.rank, env.world_size, 2), rt, seq_cfg)
    torch.save({"eval": (loss, acc, count), "seq_eval": ev, "shards": shards, "batches_epoch1": batches, "backend": rt.backend}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist_mod.teardown(rt)


def run_checks(world_size: int, out_dir: str) -> list[dict]:
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
    mp.start_processes(_worker, args=(world_size, store.port, out_dir), nprocs=world_size, start_method=forked())
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(world_size)]
