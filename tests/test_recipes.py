"""Issue 16: the README's recipes run as written (shortened): a torchvision-style BatchNorm CNN with
augmentation in workers, nanoGPT's GPT(GPTConfig), a Hugging Face causal LM from its config class, a
token stream. A recipe's one-process run is its config file trained in this process (train_single.py's
entry point is under test elsewhere); GPT-2's DDP run is on two shared gloo ranks (tests/jobs.py). Where a recipe needs an
optional package, its test skips with a reason when it is missing; tests/test_models.py covers the same
shapes with stand-ins that always run."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json

import pytest
import torch
import yaml

from launch import config
from launch.commands import cli
from launch.observe.logger import read_metrics
from launch.processes.dist import DistEnv, setup
from launch.train.loop import train
from tests import jobs
from tests.helpers import PY, output, run
from tests.test_models import max_diff


def has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None and bool(__import__(module))
    except Exception:  # installed but broken, e.g. PyPI's torchvision next to the CPU torch: 'operator torchvision::nms does not exist'
        return False


def recipe(name: str, run_dir, *overrides, launcher=(PY, "train_single.py")):
    return run([*launcher, "--config", f"configs/{name}.yaml", f"run.dir={run_dir}", "train.device=cpu", *overrides], timeout=180)


def recipe_inproc(name: str, run_dir, *overrides) -> str:
    """`python train_single.py --config configs/<name>.yaml run.dir=... train.device=cpu ...` in this
    process (one thread, as the shared ranks use); returns what it printed."""
    cfg = config.load(f"configs/{name}.yaml", [f"run.dir={run_dir}", "train.device=cpu", *overrides])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), jobs.one_thread():
        train(cfg, setup(cfg, DistEnv("plain")))
    return out.getvalue()


def recipe_overrides(name: str) -> list[str]:
    """The recipe's config file as key=value overrides (its sections' keys, each value in YAML flow
    style), for the shared ranks that take overrides only; run.name as the file would give it."""
    tree = yaml.safe_load(open(f"configs/{name}.yaml"))
    return [f"run.name={name}"] + [f"{section}.{key}={json.dumps(value)}" for section, body in tree.items() for key, value in body.items()]


def test_vision_recipe_trains_with_augmentation_in_workers(tmp_path):
    recipe_inproc("vision", tmp_path, "train.epochs=2", "data.kwargs.n=512", "data.kwargs.n_eval=128")
    assert read_metrics(tmp_path)[-1]["eval_accuracy"] > 0.5


def test_nanogpt_recipe_tuple_output_own_loss_and_predict(tmp_path, capsys):
    """Trained in this process; `launch predict`'s refusal through the real command (its exit status
    and stderr), its --eval through the command's main() here."""
    text = recipe_inproc("nanogpt", tmp_path, "train.epochs=1")
    assert "loss: the model's own (model.loss_arg=targets" in text
    q = run([PY, "-m", "launch", "predict", str(tmp_path), "-o", str(tmp_path / "p.csv")])
    assert q.returncode == 2 and len(q.stderr.strip().splitlines()) == 1 and "use --eval" in q.stderr, output(q)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e, jobs.one_thread():
        cli.main(["predict", str(tmp_path), "--eval"])
    printed = capsys.readouterr()
    assert e.value.code == 0, printed
    assert json.loads(printed.out)["loss"] == pytest.approx(read_metrics(tmp_path)[-1]["eval_loss"], abs=1e-6)


def test_token_stream_recipe_trains_to_max_steps(tmp_path):
    recipe_inproc("token_stream", tmp_path, "train.max_steps=30", "ckpt.every_steps=10", "log.every_steps=10")
    records = read_metrics(tmp_path)
    assert records[-1]["step"] == 30 and records[-1]["eval_loss"] < 2.5
    assert [r["step"] for r in records if "train_loss_step" in r] == [10, 20, 30]


@pytest.mark.skipif(not has("transformers"), reason="transformers is not installed (optional: pip install -e '.[hf]')")
def test_hugging_face_gpt2_from_its_config_class_ddp_equals_one_process(tmp_path):
    """transformers' GPT2LMHeadModel(config=GPT2Config(...)), its CausalLMOutput read by .logits. SGD:
    AdamW amplifies rounding in GPT-2's key biases (zero gradient in exact arithmetic; see README)."""
    short = ["train.epochs=1", "data.kwargs.n=1024", "data.kwargs.n_eval=256", "train.optimizer=sgd", "train.lr=0.3", "train.schedule=constant", "train.warmup_steps=0"]
    assert "model output: the 'logits' of its CausalLMOutputWithCrossAttentions" in recipe_inproc("hf_gpt2", tmp_path / "one", *short)
    jobs.run_jobs(2, [("two", [*recipe_overrides("hf_gpt2"), f"run.dir={tmp_path / 'two'}", "train.device=cpu", *short, "data.batch_size=32"], "")], tmp_path / "out")
    assert jobs.ended(tmp_path / "out", "two")["ended"] == "done", jobs.log(tmp_path / "out", "two")
    w1, w2 = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("one", "two"))
    assert max_diff(w1, w2) <= 1e-5
    assert read_metrics(tmp_path / "two")[-1]["eval_loss"] == pytest.approx(read_metrics(tmp_path / "one")[-1]["eval_loss"], abs=1e-6)


@pytest.mark.skipif(not has("torchvision"), reason="torchvision is not importable here (PyPI's build needs its matching torch; see docs/data.md)")
def test_torchvision_resnet18_with_batchnorm_trains_under_ddp(tmp_path):
    tv = ["model.name=torchvision.models:resnet18", "model.kwargs={num_classes: 4}", "train.epochs=1", "data.kwargs.n=128", "data.kwargs.n_eval=64"]
    p = recipe("vision", tmp_path, *tv, "data.batch_size=16", launcher=(PY, "train_ddp.py", "--nproc", "2"))
    assert p.returncode == 0, output(p)
