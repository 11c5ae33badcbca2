"""Issue 23: fine-tuning what users already have. A tiny Llama made here (save_pretrained, random weights,
a word-level tokenizer with a chat template; launch.examples.finetune_base), chat and prompt/response
rows, LoRA and full fine-tuning under DDP (2, 3 ranks) and FSDP (2) against one process, stop and
rerun, what a LoRA checkpoint holds, the meta-device load, exports, generation and bad input."""

from __future__ import annotations

import contextlib
import io
import re
import shutil

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from launch.examples import finetune_base as fb  # noqa: E402
from launch.observe.logger import read_metrics  # noqa: E402
from tests import jobs  # noqa: E402
from tests.test_models import max_diff, train_inproc  # noqa: E402

LORA = ["model.lora.r=4", "model.lora.alpha=8"]
FULL = ["train.lr=0.1"]  # every weight moves: a learning rate for that


@pytest.fixture(scope="module")
def ft(tmp_path_factory):
    """The base, the rows, the one-process references and every multi-process run, made once."""
    root = tmp_path_factory.mktemp("ft")
    from transformers.utils import logging

    logging.disable_progress_bar()
    fb.make_base(root / "base", tie=True)
    rows = fb.rows()
    fb.write_jsonl(root / "train.jsonl", rows[:22] + fb.chat_rows()[:3])  # 25 rows: no global batch of 12 divides them
    fb.write_jsonl(root / "val.jsonl", rows[22:29])
    fb.make_base(root / "big", hidden=512, layers=2, heads=8, kv_heads=4, vocab=32768, dtype="bfloat16", tie=True)
    common = [f"model.pretrained={root / 'base'}", *data(root), "train.epochs=2", "train.optimizer=sgd", "train.lr=0.5"]
    with jobs.one_thread():
        refs = {name: train_inproc(root / name, *common, *extra, "data.batch_size=12") for name, extra in (("one_lora", LORA), ("one_full", FULL))}
    two = [*common, "data.batch_size=6", "ckpt.every_steps=2"]
    fsdp = [*two, "dist.strategy=fsdp"]
    big = [f"model.pretrained={root / 'big'}", *data(root), *LORA, "dist.strategy=fsdp", "data.batch_size=2", "train.max_steps=1", "train.optimizer=adamw"]
    at = lambda name: f"run.dir={root / name}"  # noqa: E731
    jobs.run_jobs(2, [("ddp_lora", [*two, *LORA, at("ddp_lora")], ""), ("ddp_full", [*two, *FULL, at("ddp_full")], ""),
                      ("ddp_cut", [*two, *LORA, at("ddp_cut")], "stop:step=4"), ("ddp_cut", [*two, *LORA, at("ddp_cut")], ""),
                      ("fsdp_lora", [*fsdp, *LORA, at("fsdp_lora")], ""), ("fsdp_full", [*fsdp, *FULL, at("fsdp_full")], ""),
                      ("fsdp_cut", [*fsdp, *LORA, at("fsdp_cut")], "stop:step=4"), ("fsdp_cut", [*fsdp, *LORA, at("fsdp_cut")], ""),
                      ("big", [*big, at("big")], ""),
                      ("tp_lora", [*common, *LORA, "data.batch_size=12", "dist.tp=2", at("tp_lora")], "")], root / "out2")  # issue 25: LoRA x TP
    three = [*common, "data.batch_size=4"]
    jobs.run_jobs(3, [("ddp3_lora", [*three, *LORA, at("ddp3_lora")], ""), ("ddp3_full", [*three, *FULL, at("ddp3_full")], "")], root / "out3")
    return root, refs


def data(root) -> list[str]:
    return ["model.name=transformers:AutoModelForCausalLM", "data.name=sft", f"data.path={root / 'train.jsonl'}", f"data.val_path={root / 'val.jsonl'}",
            "data.eval_batch_size=4", "log.progress=false", "train.device=cpu"]


def weights(root, name: str) -> dict:
    return torch.load(root / name / "model.pt", weights_only=True)


def test_lora_and_full_finetuning_under_ddp_and_fsdp_equal_one_process(ft):
    """SGD, 25 rows at a global batch of 12 (an uneven last step), chat and
    prompt/response rows: 2 and 3 DDP ranks and 2 FSDP ranks (built on the meta device) = one process."""
    root, refs = ft
    for kind in ("lora", "full"):
        one = refs[f"one_{kind}"][1]
        for name in (f"ddp_{kind}", f"ddp3_{kind}", f"fsdp_{kind}"):
            out = root / ("out3" if "3" in name else "out2")
            assert jobs.ended(out, name)["ended"] == "done", jobs.log(out, name)
            assert max_diff(one, weights(root, name)) <= 1e-6, name
            assert read_metrics(root / name)[-1]["eval_loss"] == pytest.approx(refs[f"one_{kind}"][0]["eval_loss"], abs=1e-6), name
    lora = weights(root, "one_lora")
    assert lora and all(".lora_A." in k or ".lora_B." in k for k in lora), "a LoRA run's model.pt holds the adapters"
    assert max(t.abs().max().item() for k, t in lora.items() if ".lora_B." in k) > 1e-3, "the adapters trained"
    base = torch.load(root / "one_full" / "model.pt", weights_only=True)
    assert "lm_head.weight" in base and torch.equal(base["lm_head.weight"], base["model.embed_tokens.weight"]), "tied weights stay tied"
    assert "LlamaDecoderLayer (model.layers.0 .. model.layers.1)" in jobs.log(root / "out2", "fsdp_full")
    assert "so their trainable modules are a unit of their own" in jobs.log(root / "out2", "fsdp_lora")


def test_lora_composes_with_tensor_parallel(ft):
    """Issue 25: LoRA on the model's own TP plan (dist.tp=2: one data-parallel rank of two TP ranks,
    fed the same global batch of 12 as one process): the adapters of the split layers train to one
    process's and model.pt holds them whole."""
    root, refs = ft
    out = root / "out2"
    assert jobs.ended(out, "tp_lora")["ended"] == "done", jobs.log(out, "tp_lora")
    assert "device mesh (data 1 x tp 2)" in jobs.log(out, "tp_lora"), jobs.log(out, "tp_lora")
    one, tp = refs["one_lora"][1], weights(root, "tp_lora")
    assert tp.keys() == one.keys() and all(tp[k].shape == one[k].shape for k in one)
    assert max_diff(one, tp) <= 1e-6
    assert read_metrics(root / "tp_lora")[-1]["eval_loss"] == pytest.approx(refs["one_lora"][0]["eval_loss"], abs=1e-6)


def test_stop_and_rerun_is_bitwise_under_ddp_and_fsdp(ft):
    root, _ = ft
    for name, ref in (("ddp_cut", "ddp_lora"), ("fsdp_cut", "fsdp_lora")):
        out = root / "out2"
        assert jobs.ended(out, name)["ended"] == "stopped" and jobs.ended(out, name, attempt=2)["ended"] == "done"
        assert "resumed from" in jobs.log(out, name, attempt=2) and "step_00000004" in jobs.log(out, name, attempt=2)
        a, b = weights(root, ref), weights(root, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_a_lora_checkpoint_holds_the_adapters_their_optimizer_state_and_which_base(ft):
    """Not the base: the adapters, their AdamW moments, and the base's path and fingerprint, in a
    sharded checkpoint (FSDP) as in a full one (DDP; its optimizer state: test_resuming_against_...)."""
    from launch.checkpoint import store
    from launch.models.pretrained import fingerprint
    from launch.parallel import dcp

    root, _ = ft
    ckpt = store.load(store.checkpoint_dir(root / "ddp_lora") / "step_00000006.pt")
    adapters = set(ckpt["model"])
    assert adapters and all(".lora_" in k for k in adapters) and len(ckpt["optimizer"]["param_groups"][0]["params"]) == len(adapters)
    assert ckpt["base"] == {"path": str(root / "base"), "fingerprint": fingerprint(str(root / "base")), "frozen": 21}  # lm_head is the embedding (tied), under both names
    full = store.load(store.checkpoint_dir(root / "ddp_full") / "step_00000006.pt")
    assert len(full["model"]) == 21 and full["base"]["frozen"] == 0
    sharded = store.checkpoint_dir(root / "big") / "step_00000001.dcp"
    keys = list(dcp.read_metadata(sharded).state_dict_metadata)
    model_keys = {k[len("model."):] for k in keys if k.startswith("model.")}
    assert model_keys and all(".lora_" in k for k in model_keys)
    assert {k[len("optim."):] for k in keys if k.startswith("optim.")} == {f"{k}.{s}" for k in model_keys for s in ("exp_avg", "exp_avg_sq", "step")}
    assert store.load(sharded)["base"]["path"] == str(root / "big")


def test_fsdp_builds_on_the_meta_device_and_no_rank_holds_the_whole_model(ft):
    """A bf16 base (tied embeddings) with fp32 adapters in units of their own: each rank holds and
    reads half the model; a whole load (from_pretrained) measured the same way grows by all of it."""
    from launch import config
    from launch.models import pretrained

    root, _ = ft
    text = jobs.log(root / "out2", "big")
    assert jobs.ended(root / "out2", "big")["ended"] == "done", text
    mine, total, grew = (float(x) for x in re.search(r"meta-device build.*holds ([\d.]+) MB of the model's ([\d.]+) MB of parameters; peak memory during the load \+([\d.]+) MB", text).groups())
    assert total > 40 and mine == pytest.approx(total / 2, rel=0.02) and grew < 0.75 * total, text
    said = []
    cfg = config.load(None, [f"model.pretrained={root / 'big'}", "model.name=transformers:AutoModelForCausalLM"])
    pretrained.build(cfg, on_meta=False, say=said.append)
    whole = float(re.search(r"peak memory during the load \+([\d.]+) MB", said[0]).group(1))
    assert whole >= 0.9 * total, said
    adapters = torch.load(root / "big" / "model.pt", weights_only=True)
    assert adapters and all(t.dtype == torch.float32 for t in adapters.values()), "fp32 adapters over the bf16 base"


def test_export_round_trips_and_eval_loss_is_the_exported_models(ft, tmp_path):
    """PEFT adapter = merged Hugging Face export = the trained model (logits); eval_loss recomputed from
    the --hf export alone, with transformers' own chat template and loss."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launch.commands import export

    root, refs = ft
    source = export.resolve(str(root / "one_lora"))
    assert "PEFT adapter" in export.export_hf(source, tmp_path / "adapter", adapter=True)
    assert "LoRA merged" in export.export_hf(source, tmp_path / "hf", adapter=False)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    trained, _, _ = export.trained_model(source)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), tmp_path / "adapter").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    rows = [*map(eval_row, fb.rows()[22:29])]
    total = count = 0.0
    with torch.no_grad():
        for messages in rows:
            enc = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt")
            ids, mask = enc["input_ids"], enc["assistant_masks"].bool()
            logits = [m(input_ids=ids).logits for m in (trained, merged, adapted)]
            assert max_diff({"x": logits[0]}, {"x": logits[1]}) <= 1e-5 and max_diff({"x": logits[0]}, {"x": logits[2]}) <= 1e-5
            out = merged(input_ids=ids, labels=torch.where(mask, ids, -100))
            n = int(mask[:, 1:].sum())
            total, count = total + float(out.loss) * n, count + n
    assert total / count == pytest.approx(refs["one_lora"][0]["eval_loss"], abs=1e-5)
    with pytest.raises(Exception, match="exists already"):
        export.export_hf(source, tmp_path / "hf", adapter=False)


def eval_row(row: dict) -> list[dict]:
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]


def test_generate_is_greedy_with_the_chat_template(ft, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launch.commands import export, generate

    root, _ = ft
    export.export_hf(export.resolve(str(root / "one_full")), tmp_path / "hf", adapter=False)
    args = type("Args", (), {"source": str(root / "one_full"), "prompt": "what is the capital of france ?", "step": None, "max_new_tokens": 5,
                             "temperature": 0.0, "seed": 0, "system": None})
    assert generate.run(args) == 0
    said = capsys.readouterr().out.strip()
    tok, model = AutoTokenizer.from_pretrained(tmp_path / "hf"), AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    greedy = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert said == tok.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert ids[0, -1] == tok.convert_tokens_to_ids("<|assistant|>"), "the prompt ends in the template's generation prompt"


def run_inproc(*overrides):
    """(the error's line, or None; what was printed) of a one-process run in this process."""
    from launch import config
    from launch.errors import UserError
    from launch.processes.dist import DistEnv, setup
    from launch.train.loop import train

    out = io.StringIO()
    try:
        cfg = config.load(None, list(overrides))
        with contextlib.redirect_stdout(out), jobs.one_thread():
            train(cfg, setup(cfg, DistEnv("plain")))
    except UserError as e:
        assert "\n" not in str(e), str(e)
        return str(e), out.getvalue()
    return None, out.getvalue()


def test_resuming_against_another_base_is_refused_in_one_line(ft, tmp_path):
    root, _ = ft
    shutil.copytree(root / "base", tmp_path / "base")
    args = [f"model.pretrained={tmp_path / 'base'}", *data(root), *LORA, "data.batch_size=12", f"run.dir={tmp_path / 'run'}"]
    assert run_inproc(*args, "train.epochs=1", "train.optimizer=adamw")[0] is None
    from launch.checkpoint import store

    ckpt = store.load(store.checkpoint_dir(tmp_path / "run") / "step_00000003.pt")
    assert {len(s) for s in ckpt["optimizer"]["state"].values()} == {3} and len(ckpt["optimizer"]["state"]) == len(ckpt["model"])  # step, exp_avg, exp_avg_sq
    fb.make_base(tmp_path / "base", tie=True, seed=1)  # the same path, other weights
    error, _ = run_inproc(*args, "train.epochs=2", "train.optimizer=adamw")
    assert error and "belong to the base" in error and "resuming against another base is refused" in error, error
