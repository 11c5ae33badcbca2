"""The bench's memory section: what one rank holds under DDP and under FSDP, at 1, 2 and 3 ranks.

Each configuration runs in fresh processes (gloo, CPU, or one CUDA device per rank): the model is
built and prepared by the launcher's own strategy (launch.parallel), AdamW takes two steps, and every
rank reports the bytes of the parameters, gradients and optimizer state it holds (local shards under
FSDP), its peak resident memory and, on CUDA, its peak allocated device memory. The goal for FSDP:
parameters + gradients + optimizer state per rank <= 1/k of DDP's plus one block.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import tempfile
from pathlib import Path

import torch

from launch.commands.bench.meshes import markdown as mesh_markdown, mesh_memory

WIDTH, DEPTH = 1024, 6  # an MLP of 6 hidden layers of 1024: about 6.3M parameters, 25 MB in fp32


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            t = getattr(t, "_local_tensor", t)
            total += t.numel() * t.element_size()
    return total


def _worker(rank: int, k: int, port: int, strategy: str, device: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(k), LOCAL_WORLD_SIZE=str(k),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LAUNCH_LAUNCHER="spawn", LAUNCH_STORE_HOSTED="1")
    torch.set_num_threads(1)
    from launch import config, parallel
    from launch.models.build import NeuralNetwork
    from launch.processes import dist as dist_mod

    # find_unused_parameters: DDP wraps without the sample batch that settling its buckets needs (same bytes)
    cfg = config.load(None, [f"train.device={device}", f"dist.strategy={strategy}", "log.progress=false", "dist.find_unused_parameters=true"])
    rt = dist_mod.setup(cfg, dist_mod.detect()) if k > 1 else dist_mod.setup(cfg, dist_mod.DistEnv("plain"))
    torch.manual_seed(0)
    model = NeuralNetwork(WIDTH, [WIDTH] * DEPTH, 10).to(rt.device)
    s = parallel.make(cfg, rt, lambda msg: None)
    x, y = torch.randn(8, WIDTH, device=rt.device), torch.randint(0, 10, (8,), device=rt.device)
    if strategy == "fsdp":
        s.prepare(model, None, (x, y))  # fully_shard per layer, then the root
    wrapped = s.wrap(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    grads = 0
    for _ in range(2):
        torch.nn.functional.cross_entropy(wrapped(x), y).backward()
        grads = _local_bytes(p.grad for p in model.parameters())
        opt.step()
        opt.zero_grad(set_to_none=True)
    block = max(_local_bytes(m.parameters()) * k for m in model.linear_relu_stack if any(True for _ in m.parameters()))
    report = {
        "params": _local_bytes(model.parameters()), "grads": grads,
        "optimizer": _local_bytes(t for st in opt.state.values() for t in st.values()),
        "largest_block": block if strategy == "fsdp" else 0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if rt.device.type == "cuda" else None,
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    dist_mod.teardown(rt)


def measure(strategy: str, k: int, device: str) -> dict:
    import torch.distributed as dist
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        store = dist.TCPStore("127.0.0.1", 0, k, is_master=True, wait_for_workers=False)
        mp.start_processes(_worker, args=(k, store.port, strategy, device, out), nprocs=k, start_method="spawn")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(k)]
    worst = max(ranks, key=lambda r: r["params"] + r["grads"] + r["optimizer"])
    state = worst["params"] + worst["grads"] + worst["optimizer"]
    return {"strategy": strategy, "ranks": k, "device": device, "state_mb": round(state / 2**20, 2),
            "params_mb": round(worst["params"] / 2**20, 2), "grads_mb": round(worst["grads"] / 2**20, 2),
            "optimizer_mb": round(worst["optimizer"] / 2**20, 2), "largest_block_mb": round(worst["largest_block"] / 2**20, 2),
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in ranks), 1),
            "cuda_peak_mb": max((r["cuda_peak_mb"] or 0) for r in ranks) if device == "cuda" else None}


def memory_section(devices: list[str], say) -> list[dict]:
    """DDP against FSDP on the MLP; then fine-tuning (launch.commands.bench.finetune), where transformers and peft are installed."""
    rows = []
    for device in devices:
        if device not in ("cpu", "cuda"):
            continue
        for k in (1, 2, 3):
            if device == "cuda" and k > torch.cuda.device_count():
                continue
            for strategy in ("ddp", "fsdp"):
                say(f"memory: {strategy} at {k} rank(s) on {device}")
                rows.append(measure(strategy, k, device))
        if importlib.util.find_spec("peft") is not None and importlib.util.find_spec("transformers") is not None:
            from launch.commands.bench.finetune import memory_rows

            rows += memory_rows(device, say)
    return rows + mesh_memory(devices, say)  # DDP, FSDP, HSDP, TP, FSDP x TP on one Llama model (rows with a 'mesh' key)


def markdown(rows: list[dict]) -> list[str]:
    meshed = [r for r in rows if "mesh" in r]
    tuned = [r for r in rows if r.get("kind") == "finetune"]
    rows = [r for r in rows if "mesh" not in r and r.get("kind") != "finetune"]
    lines = _strategies(rows) if rows else []
    if tuned:
        from launch.commands.bench.finetune import markdown as finetune_markdown

        lines += finetune_markdown(tuned)
    return lines + (mesh_markdown(meshed) if meshed else [])


def _strategies(rows: list[dict]) -> list[str]:
    lines = ["### Memory per rank: DDP against FSDP (an MLP of 6.3M parameters, AdamW; the rank holding most)", "",
             "| device | ranks | strategy | params + grads + optimizer MB | of DDP's | goal (1/k + one block) | peak RSS MB | CUDA peak MB |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    ddp = {(r["device"], r["ranks"]): r["state_mb"] for r in rows if r["strategy"] == "ddp"}
    for r in rows:
        base = ddp.get((r["device"], r["ranks"]))
        share = f"{r['state_mb'] / base:.2f}" if base else ""
        goal = f"{base / r['ranks'] + r['largest_block_mb'] * 4:.1f}" if base and r["strategy"] == "fsdp" else ""
        cuda = "" if r["cuda_peak_mb"] is None else f"{r['cuda_peak_mb']:.0f}"
        lines.append(f"| {r['device']} | {r['ranks']} | {r['strategy']} | {r['state_mb']:.2f} | {share} | {goal} | {r['peak_rss_mb']:.0f} | {cuda} |")
    return lines + [""]
