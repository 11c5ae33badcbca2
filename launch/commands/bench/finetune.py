"""The bench's fine-tuning measurements: memory per rank (in the memory section) and the sft data path.

Memory: a Llama-architecture model of about 110M parameters made from its config (random weights,
saved once with save_pretrained; nothing is downloaded) is built the launcher's way (model.pretrained,
model.lora, the strategy's prepare: under FSDP on the meta device, each rank reading its shards),
AdamW takes two steps on a batch of 2 x 64 tokens, and each rank reports the bytes of its trainable
parameters, its frozen ones (the base), its gradients and its optimizer state (local shards under
FSDP). Rows: full fine-tuning and LoRA (r=8, all-linear) in one process, LoRA under FSDP at 2 and 3
ranks. Goals: LoRA's trainable state (parameters + gradients + AdamW moments) <= 2% of full
fine-tuning's; the base's bytes per rank 1/k under FSDP.

The sft data path (`--sections sft`): rows/s of tokenizing prompt/response rows with a chat template
with {% generation %} marks, without them (each turn rendered), and without a template, with a BPE
tokenizer of 8,000 tokens trained here; against it, rows/s that the training step of the 110M model
consumes at a batch of 8 rows. Both are per CPU core (one thread, process time: the numbers hold on
a shared machine), so the ratio says how many cores' worth of tokenizing one core of training needs.
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

ARCH = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 12,
        "vocab_size": 16000, "max_position_embeddings": 512}
RUNS = (("full", "ddp", 1), ("lora", "ddp", 1), ("lora", "fsdp", 2), ("lora", "fsdp", 3))


def _local(t) -> int:
    t = getattr(t, "_local_tensor", t)
    return t.numel() * t.element_size()


def save_base(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**ARCH)).save_pretrained(path)
    return path


def _worker(rank: int, k: int, port: int, base: str, mode: str, strategy: str, device: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(k), LOCAL_WORLD_SIZE=str(k),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LAUNCH_LAUNCHER="spawn", LAUNCH_STORE_HOSTED="1")
    torch.set_num_threads(1)
    from launch import config, parallel
    from launch.models.build import build_model
    from launch.processes import dist as dist_mod
    from launch.train.optim import make_optimizer

    cfg = config.load(None, ["model.name=transformers:AutoModelForCausalLM", f"model.pretrained={base}", f"dist.strategy={strategy}",
                             "train.optimizer=adamw", f"train.device={device}", *(["model.lora.r=8"] if mode == "lora" else [])])
    rt = dist_mod.setup(cfg, dist_mod.detect()) if k > 1 else dist_mod.setup(cfg, dist_mod.DistEnv("plain"))
    torch.manual_seed(0)
    model = build_model(cfg, 0, None, rt)
    x = torch.randint(0, ARCH["vocab_size"], (2, 64), device=rt.device)
    s = parallel.make(cfg, rt, lambda msg: None)
    s.prepare(model, None, (x, x))
    wrapped = s.wrap(model)
    opt = make_optimizer(cfg, model.parameters())
    grads = 0
    for _ in range(2):
        logits = wrapped(input_ids=x).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
        grads = sum(_local(p.grad) for p in model.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
    params = {id(p): p for p in model.parameters()}.values()
    report = {"trainable": sum(_local(p) for p in params if p.requires_grad), "frozen": sum(_local(p) for p in params if not p.requires_grad),
              "grads": grads, "optimizer": sum(_local(t) for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)),
              "parameters": sum(p.numel() for p in params), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    dist_mod.teardown(rt)


def measure(base: Path, mode: str, strategy: str, k: int, device: str) -> dict:
    import torch.distributed as dist
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        store = dist.TCPStore("127.0.0.1", 0, k, is_master=True, wait_for_workers=False)
        mp.start_processes(_worker, args=(k, store.port, str(base), mode, strategy, device, out), nprocs=k, start_method="spawn")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(k)]
    worst = max(ranks, key=lambda r: r["trainable"] + r["frozen"] + r["grads"] + r["optimizer"])
    mb = lambda v: round(v / 2**20, 2)  # noqa: E731
    return {"kind": "finetune", "mode": mode, "strategy": strategy, "ranks": k, "device": device, "parameters": worst["parameters"],
            "trainable_state_mb": mb(worst["trainable"] + worst["grads"] + worst["optimizer"]), "base_mb": mb(worst["frozen"]),
            "trainable_mb": mb(worst["trainable"]), "grads_mb": mb(worst["grads"]), "optimizer_mb": mb(worst["optimizer"]),
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in ranks), 1)}


def memory_rows(device: str, say) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = save_base(Path(tmp) / "base")
        for mode, strategy, k in RUNS:
            if device == "cuda" and k > torch.cuda.device_count():
                continue
            say(f"memory: fine-tuning ({mode}) under {strategy} at {k} rank(s) on {device}")
            rows.append(measure(base, mode, strategy, k, device))
    return rows


def markdown(rows: list[dict]) -> list[str]:
    full = next((r["trainable_state_mb"] for r in rows if r["mode"] == "full"), None)
    one = next((r["base_mb"] for r in rows if r["mode"] == "lora" and r["ranks"] == 1), None)
    lines = [f"### Fine-tuning memory per rank (a Llama of {rows[0]['parameters'] / 1e6:.0f}M parameters, AdamW; LoRA r=8 all-linear)", "",
             "| device | run | ranks | trainable + grads + AdamW MB | of full fine-tuning's | base MB | base of one rank's | peak RSS MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        share = f"{r['trainable_state_mb'] / full:.4f}" if full else ""
        base = f"{r['base_mb'] / one:.2f}" if one and r["mode"] == "lora" else ""
        lines.append(f"| {r['device']} | {r['mode']} ({r['strategy']}) | {r['ranks']} | {r['trainable_state_mb']:.2f} | {share} | {r['base_mb']:.1f} | {base} | {r['peak_rss_mb']:.0f} |")
    return lines + [""]


# --------------------------------------------------------------------------- the sft data path


def _bpe(words: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator([" ".join(words[i : i + 50]) for i in range(0, len(words), 50)],
                            trainers.BpeTrainer(vocab_size=8000, special_tokens=["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tokenization(say, n: int = 2000) -> dict:
    """Rows/s of the sft encoder (marked template, turn by turn, none) and of the 110M model's training step."""
    import random

    from launch.data.sft import Encoder
    from launch.examples.finetune_base import MARKED

    rng = random.Random(0)
    vocab = [f"w{rng.randrange(20000)}" for _ in range(5000)]
    words = [rng.choice(vocab) for _ in range(200_000)]
    rows = [{"prompt": " ".join(rng.choices(vocab, k=60)), "response": " ".join(rng.choices(vocab, k=120))} for _ in range(n)]
    tok = _bpe(words)
    result: dict = {"rows": n}
    for name, template in (("marked", MARKED), ("turn_by_turn", MARKED.replace("{% generation %}", "").replace("{% endgeneration %}", "")), ("none", None)):
        tok.chat_template = template
        enc = Encoder(tok, "bench")
        t0 = time.process_time()
        tokens = sum(len(ids) for ids, _ in enc.many([(r, "bench") for r in rows]))
        result[f"{name}_rows_per_s"] = n / (time.process_time() - t0)
        result["tokens_per_row"] = tokens / n
        say(f"sft tokenization ({name}): {result[f'{name}_rows_per_s']:,.0f} rows/s")
    result["train_rows_per_s"] = _train_rows_per_s(int(result["tokens_per_row"]))
    say(f"the 110M model's training step (one CPU core): {result['train_rows_per_s']:.2f} rows/s")
    return result


def _train_rows_per_s(length: int, batch: int = 8, steps: int = 2) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _steps(length, batch, steps)
    finally:
        torch.set_num_threads(threads)


def _steps(length: int, batch: int, steps: int) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**ARCH))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, ARCH["vocab_size"], (batch, length))
    times = []
    for _ in range(steps + 1):
        t0 = time.process_time()
        logits = model(input_ids=x).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.process_time() - t0)
    return batch / sorted(times[1:])[len(times[1:]) // 2]


def sft_markdown(d: dict) -> list[str]:
    train = d["train_rows_per_s"]
    cells = "; ".join(f"{k.replace('_rows_per_s', '').replace('_', ' ')} {d[k]:,.0f} rows/s ({d[k] / train:,.0f}x the step)" for k in ("marked_rows_per_s", "turn_by_turn_rows_per_s", "none_rows_per_s"))
    return [f"### The sft data path ({d['rows']:,} rows of {d['tokens_per_row']:.0f} tokens, an 8k BPE tokenizer)", "",
            f"Tokenizing, once at start-up on every rank, per CPU core: {cells}. The training step of the 110M model, per CPU core: {train:.2f} rows/s.", ""]
