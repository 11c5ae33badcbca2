"""Issue 16: the README's recipes run as written (shortened): a torchvision-style BatchNorm CNN with
augmentation in workers, nanoGPT's GPT(GPTConfig), a Hugging Face causal LM from its config class, a
token stream. Where a recipe needs an optional package, its test skips with a reason when it is
missing; tests/test_models.py covers the same shapes with stand-ins that always run."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json

import pytest
import torch

from launch import config
from launch.observe.logger import read_metrics
from launch.processes.dist import DistEnv, setup
from launch.train.loop import train
from tests.helpers import PY, output, run
from tests.test_models import max_diff, spawn, train_inproc


def has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None and bool(__import__(module))
    except Exception:  # installed but broken, e.g. PyPI's torchvision next to the CPU torch: 'operator torchvision::nms does not exist'
        return False


def recipe(name: str, run_dir, *overrides, launcher=(PY, "train_single.py")):
    return run([*launcher, "--config", f"configs/{name}.yaml", f"run.dir={run_dir}", "train.device=cpu", *overrides], timeout=180)


def test_vision_recipe_trains_with_augmentation_in_workers(tmp_path):
    p = recipe("vision", tmp_path, "train.epochs=2", "data.kwargs.n=512", "data.kwargs.n_eval=128")
    assert p.returncode == 0, output(p)
    assert read_metrics(tmp_path)[-1]["eval_accuracy"] > 0.5


def test_nanogpt_recipe_tuple_output_own_loss_and_predict(tmp_path):
    p = recipe("nanogpt", tmp_path, "train.epochs=1")
    assert p.returncode == 0, output(p)
    assert "loss: the model's own (model.loss_arg=targets" in p.stdout
    q = run([PY, "-m", "launch", "predict", str(tmp_path), "-o", str(tmp_path / "p.csv")])
    assert q.returncode == 2 and len(q.stderr.strip().splitlines()) == 1 and "use --eval" in q.stderr, output(q)
    e = run([PY, "-m", "launch", "predict", str(tmp_path), "--eval"])
    assert e.returncode == 0, output(e)
    assert json.loads(e.stdout)["loss"] == pytest.approx(read_metrics(tmp_path)[-1]["eval_loss"], abs=1e-6)


def test_token_stream_recipe_trains_to_max_steps(tmp_path):
    p = recipe("token_stream", tmp_path, "train.max_steps=30", "ckpt.every_steps=10", "log.every_steps=10")
    assert p.returncode == 0, output(p)
    records = read_metrics(tmp_path)
    assert records[-1]["step"] == 30 and records[-1]["eval_loss"] < 2.5
    assert [r["step"] for r in records if "train_loss_step" in r] == [10, 20, 30]


@pytest.mark.skipif(not has("transformers"), reason="transformers is not installed (optional: pip install -e '.[hf]')")
def test_hugging_face_gpt2_from_its_config_class_ddp_equals_one_process(tmp_path):
    """transformers' GPT2LMHeadModel(config=GPT2Config(...)), its CausalLMOutput read by .logits. SGD:
    AdamW amplifies rounding in GPT-2's key biases (zero gradient in exact arithmetic; see README)."""
    short = ["train.epochs=1", "data.kwargs.n=1024", "data.kwargs.n_eval=256", "train.optimizer=sgd", "train.lr=0.3", "train.schedule=constant", "train.warmup_steps=0"]
    cfg = config.load("configs/hf_gpt2.yaml", [f"run.dir={tmp_path / 'one'}", "train.device=cpu", *short])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # the one process in this process: a subprocess less
        train(cfg, setup(cfg, DistEnv("plain")))
    assert "model output: the 'logits' of its CausalLMOutputWithCrossAttentions" in out.getvalue()
    two = recipe("hf_gpt2", tmp_path / "two", *short, "data.batch_size=32", launcher=(PY, "train_ddp.py", "--nproc", "2"))
    assert two.returncode == 0, output(two)
    w1, w2 = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("one", "two"))
    assert max_diff(w1, w2) <= 1e-5
    assert read_metrics(tmp_path / "two")[-1]["eval_loss"] == pytest.approx(read_metrics(tmp_path / "one")[-1]["eval_loss"], abs=1e-6)


@pytest.mark.skipif(not has("torchvision"), reason="torchvision is not importable here (PyPI's build needs its matching torch; see docs/data.md)")
def test_torchvision_resnet18_with_batchnorm_trains_under_ddp(tmp_path):
    tv = ["model.name=torchvision.models:resnet18", "model.kwargs={num_classes: 4}", "train.epochs=1", "data.kwargs.n=128", "data.kwargs.n_eval=64"]
    p = recipe("vision", tmp_path, *tv, "data.batch_size=16", launcher=(PY, "train_ddp.py", "--nproc", "2"))
    assert p.returncode == 0, output(p)
