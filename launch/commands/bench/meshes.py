"""The bench's device meshes (issue 25): memory per rank and step times for DDP, FSDP, HSDP and TP on one model.

Every configuration runs in fresh processes through the launcher's own strategies (launch.parallel):
a Llama-architecture model built from its config (transformers; nothing downloaded), AdamW, a few
steps. `mesh_memory` (in `--sections memory`): the bytes of parameters, gradients and optimizer state
that the rank holding most keeps (local shards of DTensors), at 4 ranks on the CPU (gloo) and on CUDA
where 4 GPUs exist. `step_times` (`--sections meshes`, the GPU lane): median step times over NCCL of
TP, HSDP and FSDP x TP against DDP and FSDP on as many GPUs as there are (an even number, 2 or more);
without CUDA it records why nothing ran.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

# (name, settings) at world size k: HSDP replicates over 2 groups, TP splits over 2 ranks
MESHES = [("ddp", ["dist.find_unused_parameters=true"]), ("fsdp", ["dist.strategy=fsdp"]),
          ("hsdp", ["dist.strategy=fsdp", "dist.replicate=2"]), ("tp", ["dist.tp=2"]),
          ("fsdp x tp", ["dist.strategy=fsdp", "dist.tp=2"])]
SMALL = dict(vocab_size=1024, hidden_size=256, intermediate_size=688, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=4)
LARGE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_attention_heads=16, num_key_value_heads=8, num_hidden_layers=8)


def _local_bytes(tensors) -> int:
    return sum(getattr(t, "_local_tensor", t).numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _worker(rank: int, k: int, port: int, settings: list, device: str, out_dir: str, large: bool, steps: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(k), LOCAL_WORLD_SIZE=str(k),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LAUNCH_LAUNCHER="spawn", LAUNCH_STORE_HOSTED="1")
    torch.set_num_threads(1)
    from transformers import LlamaConfig, LlamaForCausalLM

    from launch import config, parallel
    from launch.processes import dist as dist_mod

    cfg = config.load(None, [f"train.device={device}", "log.progress=false", *settings])
    rt = dist_mod.setup(cfg, dist_mod.detect())
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**(LARGE if large else SMALL), max_position_embeddings=512)).to(rt.device)
    s = parallel.make(cfg, rt, lambda msg: None)
    batch, seq = (8, 512) if large else (4, 64)
    x = torch.randint(0, model.config.vocab_size, (batch, seq), device=rt.device)
    s.prepare(model, None, (x, x))
    wrapped = s.wrap(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    grads, times = 0, []
    for i in range(steps):
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with s.micro_step(wrapped, sync=True, real=True):
            logits = wrapped(x).logits
            torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x.flatten()).backward()
        grads = _local_bytes(p.grad for p in model.parameters())
        opt.step()
        opt.zero_grad(set_to_none=True)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    report = {"params": _local_bytes(model.parameters()), "grads": grads,
              "optimizer": _local_bytes(t for st in opt.state.values() for t in st.values()),
              "step_ms": 1000 * statistics.median(times[3:] or times),
              "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if rt.device.type == "cuda" else None}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    dist_mod.teardown(rt)


def _measure(name: str, settings: list, k: int, device: str, large: bool = False, steps: int = 2) -> dict:
    import torch.distributed as dist
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        store = dist.TCPStore("127.0.0.1", 0, k, is_master=True, wait_for_workers=False)
        mp.start_processes(_worker, args=(k, store.port, settings, device, out, large, steps), nprocs=k, start_method="spawn")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(k)]
    worst = max(ranks, key=lambda r: r["params"] + r["grads"] + r["optimizer"])
    mb = lambda b: round(b / 2**20, 2)  # noqa: E731
    return {"mesh": name, "ranks": k, "device": device, "state_mb": mb(worst["params"] + worst["grads"] + worst["optimizer"]),
            "params_mb": mb(worst["params"]), "grads_mb": mb(worst["grads"]), "optimizer_mb": mb(worst["optimizer"]),
            "step_ms": round(max(r["step_ms"] for r in ranks), 2),
            "cuda_peak_mb": max(r["cuda_peak_mb"] or 0 for r in ranks) if device == "cuda" else None}


def mesh_memory(devices: list[str], say) -> list[dict]:
    """Parameters + gradients + optimizer per rank for every mesh at 4 ranks (rows with a 'mesh' key)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        say("memory: meshes skipped (transformers is not installed: pip install -e '.[hf]')")
        return []
    rows = []
    for device in devices:
        if device == "cpu" or (device == "cuda" and torch.cuda.device_count() >= 4):
            for name, settings in MESHES:
                say(f"memory: {name} at 4 ranks on {device} (a Llama model of 3.4M parameters)")
                rows.append(_measure(name, settings, 4, device))
    return rows


def step_times(say) -> dict:
    """The GPU lane: NCCL step times of every mesh on an even number of GPUs, or why none ran."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA"}
    k = torch.cuda.device_count() // 2 * 2
    if k < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU: TP and HSDP need 2 or more"}
    rows = []
    for name, settings in MESHES:
        if name == "hsdp" and k < 4:
            continue
        say(f"meshes: {name} on {k} GPUs (NCCL), a Llama model of 0.6B parameters, 8 x 512 tokens per data-parallel rank")
        rows.append(_measure(name, settings, k, "cuda", large=True, steps=13))
    return {"gpus": k, "gpu": torch.cuda.get_device_name(0), "rows": rows}


def markdown(rows: list[dict]) -> list[str]:
    lines = ["### Memory per rank on a device mesh (a Llama model of 3.4M parameters, AdamW, 4 ranks; the rank holding most)", "",
             "| device | mesh | params + grads + optimizer MB | of DDP's | params MB | grads MB | optimizer MB |", "|---|---|---:|---:|---:|---:|---:|"]
    ddp = {r["device"]: r["state_mb"] for r in rows if r["mesh"] == "ddp"}
    for r in rows:
        share = f"{r['state_mb'] / ddp[r['device']]:.2f}" if ddp.get(r["device"]) else ""
        lines.append(f"| {r['device']} | {r['mesh']} | {r['state_mb']:.2f} | {share} | {r['params_mb']:.2f} | {r['grads_mb']:.2f} | {r['optimizer_mb']:.2f} |")
    return lines + [""]


def steps_markdown(res: dict) -> list[str]:
    if "skipped" in res:
        return [f"### Step times on a device mesh (GPU lane): not run here ({res['skipped']})", ""]
    lines = [f"### Step times on a device mesh: {res['gpus']} x {res['gpu']}, NCCL (median of 10 steps after 3)", "",
             "| mesh | step ms | of DDP's | params + grads + optimizer MB per rank | CUDA peak MB |", "|---|---:|---:|---:|---:|"]
    ddp = next((r["step_ms"] for r in res["rows"] if r["mesh"] == "ddp"), None)
    for r in res["rows"]:
        lines.append(f"| {r['mesh']} | {r['step_ms']:.1f} | {r['step_ms'] / ddp:.2f} | {r['state_mb']:.0f} | {r['cuda_peak_mb']:.0f} |" if ddp else f"| {r['mesh']} | {r['step_ms']:.1f} | | {r['state_mb']:.0f} | |")
    return lines + [""]
