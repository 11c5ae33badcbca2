"""Evaluation metrics on real gloo process groups, for tests/test_metrics.py.

`scenarios(rt)` evaluates fixed models with train.metrics on splits that divide no batch (23 samples,
11 sequences, evaluation batches of 4) and returns every record, with what the import-path metric was
given on this rank; `run(world_size, out_dir)` spawns the ranks (as tests/dist_checks.py does) and
returns each rank's scenarios.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.helpers import forked

N = 23  # divides by neither 2, 3 nor the evaluation batch of 4
N_SEQ = 11
BATCH = 4


def data() -> dict:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(N, 4, generator=g)
    return {
        "x": x,
        "classes": torch.randint(0, 7, (N,), generator=g),
        "binary": torch.randint(0, 2, (N,), generator=g),
        "labels3": (torch.rand(N, 3, generator=g) < 0.5).float(),
        "values": torch.randn(N, 1, generator=g),
    }


def models() -> dict:
    from launch.models.build import NeuralNetwork
    from tests.user_code import SeqGRU

    out = {}
    for i, (name, make) in enumerate({
        "classes": lambda: NeuralNetwork(4, [8], 7), "binary": lambda: NeuralNetwork(4, [8], 2),
        "labels3": lambda: nn.Linear(4, 3), "values": lambda: nn.Linear(4, 1), "seq": SeqGRU,
    }.items()):
        torch.manual_seed(i)
        out[name] = make()
    return out


# name -> (model, target, train.loss, train.metrics, lockstep)
SCENARIOS = {
    "default": ("classes", "classes", "cross_entropy", "[auto]", False),
    "classes": ("classes", "classes", "cross_entropy", "[auto,top5,f1_macro,auroc,tests.metric_fns:record]", False),
    "classes_lockstep": ("classes", "classes", "cross_entropy", "[auto,top5,f1_macro,auroc,tests.metric_fns:record]", True),
    "binary": ("binary", "binary", "cross_entropy", "[auto,f1_macro,auroc]", False),
    "labels3": ("labels3", "labels3", "bce_with_logits", "[auto,f1_macro,auroc]", False),
    "values": ("values", "values", "mse", "[auto,mse,mae,tests.metric_fns:record]", False),
    "seq": ("seq", "seq", "cross_entropy", "[auto,top5,f1_macro,tests.metric_fns:exact_match,tests.metric_fns:record]", False),
}


def split(name: str):
    """(inputs, targets) of a scenario's evaluation split."""
    from tests.user_code import Tokens

    if name == "seq":
        seq = Tokens("eval", n=N_SEQ)
        return seq.x, seq.y
    d = data()
    return d["x"], d[name]


def scenarios(rt) -> dict:
    from launch import config
    from launch.data.feeder import Feeder
    from launch.data.types import Split
    from launch.train.evaluate import evaluate
    from launch.train.task import Task
    from tests import metric_fns

    nets, out = models(), {}
    for name, (model_name, target_name, loss, metrics, lockstep) in SCENARIOS.items():
        cfg = config.load(None, [f"train.loss={loss}", f"train.metrics={metrics}", f"data.eval_batch_size={BATCH}", "train.device=cpu"])
        model = nets[model_name]
        x, y = split(target_name)
        task = Task(cfg, model)
        task.check(model, x[:BATCH], y[:BATCH])  # as a run does at start: fits the metrics
        metric_fns.calls.clear()
        feeder = Feeder(Split(x, y), cfg, rt.device, rt.env.rank, rt.env.world_size, BATCH)
        record = evaluate(model, task, feeder, rt, cfg, lockstep=lockstep)
        out[name] = {"record": record, "keys": list(record), "given": list(metric_fns.calls)}  # cleared after the check's call
    return out


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LAUNCH_LAUNCHER="spawn", LAUNCH_STORE_HOSTED="1",
    )
    torch.set_num_threads(1)
    from launch import config
    from launch.processes import dist as dist_mod

    rt = dist_mod.setup(config.load(None, ["train.device=cpu"]), dist_mod.detect())
    result = scenarios(rt)
    torch.save({"scenarios": result, "backend": rt.backend}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist_mod.teardown(rt)


def run(world_size: int, out_dir: str) -> list[dict]:
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
    mp.start_processes(_worker, args=(world_size, store.port, out_dir), nprocs=world_size, start_method=forked())
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(world_size)]
