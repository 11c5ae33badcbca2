"""Issue 16: the models users already have keep every promise: BatchNorm (global statistics), dropout
(a stream per rank), random augmentation in DataLoader workers (a pure function of seed, epoch and
sample), model outputs (mappings, tuples, own losses) and first-hour mistakes."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess

import pytest
import torch

from launch import config
from launch.errors import UserError
from launch.observe.logger import read_metrics
from launch.processes.dist import DistEnv, setup
from launch.train.loop import train
from tests import jobs
from tests.helpers import PY, output, run

# A BatchNorm CNN on random-flipped, random-shifted images. 97 samples: with 2 ranks of 8 and two
# micro-batches per step, the last micro-step holds one sample, so rank 1 runs the zero-weight stand-in.
VISION = [
    "model.name=launch.examples.vision:SmallResNet", "model.kwargs={width: 8, blocks: 1}",
    "data.name=launch.examples.vision:Stripes", "data.kwargs={n: 97, n_eval: 41, size: 8}",
    "data.eval_batch_size=16", "train.epochs=2", "train.accum_steps=2", "train.lr=0.05", "train.momentum=0.9",
    "log.progress=false", "train.device=cpu",
]


def train_inproc(run_dir, *overrides):
    cfg = config.load(None, [f"run.dir={run_dir}", *overrides])
    out = io.StringIO()
    with jobs.one_thread(), contextlib.redirect_stdout(out):
        result = train(cfg, setup(cfg, DistEnv("plain")))
    return result, torch.load(run_dir / "model.pt", weights_only=True), out.getvalue()


def spawn(n, run_dir, *overrides, **kw):
    return run([PY, "train_ddp.py", "--nproc", str(n), f"run.dir={run_dir}", *overrides], timeout=180, **kw)


def max_diff(a: dict, b: dict, keys=None) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in (keys or a))


def launch_inproc(*args) -> subprocess.CompletedProcess:
    """`python -m launch ARGS` in this process (no process boundary is under test): its command line,
    exit code, stdout and stderr, as the finished process would give them."""
    from launch.commands import cli

    out, err, code = io.StringIO(), io.StringIO(), 0
    with jobs.one_thread(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
    return subprocess.CompletedProcess(["launch", *map(str, args)], code, out.getvalue(), err.getvalue())


def predict_eval(run_dir) -> dict:
    p = launch_inproc("predict", run_dir / "model.pt", "--eval")
    assert p.returncode == 0, output(p)
    return json.loads(p.stdout.strip().splitlines()[-1])


# dropout, BatchNorm and worker augmentation, killed between checkpoints (test_ddp_resume_after_kill_...)
KILLED = [*VISION, "model.kwargs={width: 8, blocks: 1, dropout: 0.3}", "data.batch_size=8", "data.num_workers=2", "ckpt.every_steps=3"]
HF_LIKE = ["model.name=tests.user_models:MappingLM", "model.kwargs={config: {_target_: tests.user_models:LMConfig, width: 16}}",
           "data.name=tests.user_models:HFLabels", "train.optimizer=sgd", "train.lr=0.5", "log.progress=false", "train.device=cpu"]
OWN = [*HF_LIKE, "model.loss_arg=labels", "model.loss_reduction=mean_shifted", "train.epochs=2"]
UNUSED = ["model.name=tests.user_models:Unused", "data.n_train=64", "data.n_eval=16", "data.features=16",
          "data.batch_size=8", "log.progress=false", "train.device=cpu"]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Every 2-rank run of this file whose point is what the training computes, on one pair of spawned
    gloo ranks (tests/jobs.py: each job a fresh run, resumed from disk). First, with a real launcher,
    the run whose rank 1 is killed (-9) at step 8; its rerun is a job. Returns (base, the killed process)."""
    base = tmp_path_factory.mktemp("two")
    (base / "probe").mkdir()
    killed = spawn(2, base / "killed", *KILLED, LAUNCH_FAULT="kill:step=8:rank=1")
    at = lambda name: f"run.dir={base / name}"  # noqa: E731
    jobs.run_jobs(2, [
        ("bn", [*VISION, "data.batch_size=8", "data.num_workers=2", at("bn")], ""),
        ("nosync", [*VISION, "data.batch_size=8", "dist.sync_batchnorm=false", at("nosync")], ""),
        ("dropout", ["model.name=tests.user_models:DropoutProbe", "data.n_train=64", "data.n_eval=16", "data.features=16",
                     "data.batch_size=8", "train.epochs=1", "log.progress=false", "train.device=cpu", at("dropout")], "", {"PROBE_DIR": base / "probe"}),
        ("kill_ref", [*KILLED, at("kill_ref")], ""),
        ("killed", [*KILLED, at("killed")], ""),  # the same command again, after the kill
        ("own", [*OWN, "data.batch_size=8", at("own")], ""),
        ("unused_ok", [*UNUSED, "dist.find_unused_parameters=true", "train.epochs=1", at("unused_ok")], ""),
    ], base / "out")
    return base, killed


def done(two, name: str) -> str:
    """What rank 0 of job `name` printed, once it is known to have finished."""
    out = two[0] / "out"
    assert jobs.ended(out, name)["ended"] == "done", jobs.log(out, name)
    return jobs.log(out, name)


@pytest.fixture(scope="module")
def vision_one(tmp_path_factory):
    d = tmp_path_factory.mktemp("vision_one")
    return train_inproc(d, *VISION, "data.batch_size=16", "data.num_workers=0") + (d,)


def test_batchnorm_and_augmentation_in_workers_ddp_equals_one_process(vision_one, two):
    """Global BatchNorm statistics (also over the uneven last step's stand-in and across accumulation),
    and a sample's flip and shift the same whoever loads it: 2 ranks x 2 workers = 1 process, no workers."""
    one, w1, _, _ = vision_one
    done(two, "bn")
    tmp_path = two[0] / "bn"
    w2 = torch.load(tmp_path / "model.pt", weights_only=True)
    stats = [k for k in w1 if "running" in k]
    assert stats and max_diff(w1, w2, stats) <= 1e-5, "running statistics"
    assert max_diff(w1, w2) <= 1e-5, "parameters and statistics"
    rec = read_metrics(tmp_path)[-1]
    assert rec["eval_loss"] == pytest.approx(one["eval_loss"], abs=1e-5)
    # the logged evaluation is the evaluation of the saved model
    assert predict_eval(tmp_path)["loss"] == pytest.approx(rec["eval_loss"], abs=1e-6)


def test_without_global_statistics_the_run_says_so_and_evaluates_the_saved_model(vision_one, two):
    _, w1, _, _ = vision_one
    said = done(two, "nosync")
    tmp_path = two[0] / "nosync"
    first = said.splitlines()[0]
    assert "dist.sync_batchnorm=false" in first and "differ from one process" in first, said
    w2 = torch.load(tmp_path / "model.pt", weights_only=True)
    assert max_diff(w1, w2) > 1e-3  # what global statistics fix (0.2 and more after a few epochs)
    assert predict_eval(tmp_path)["loss"] == pytest.approx(read_metrics(tmp_path)[-1]["eval_loss"], abs=1e-6)


def test_each_rank_draws_its_own_dropout_masks(two):
    done(two, "dropout")
    probe = two[0] / "probe"
    masks = [torch.load(probe / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert masks[0].shape == masks[1].shape and not torch.equal(masks[0], masks[1])


def test_ddp_resume_after_kill_is_bitwise_with_dropout_batchnorm_and_worker_augmentation(two):
    """Every rank's generator is saved and restored to that rank; the workers' augmentation is a function
    of (seed, epoch, index). Killed (-9) mid-run between checkpoints, then rerun: the same weights bit for bit."""
    base, killed = two
    assert killed.returncode != 0, output(killed)
    again = done(two, "killed")
    assert "resumed from" in again and "step 6" in again, again
    done(two, "kill_ref")  # the uninterrupted run
    a, b = (torch.load(base / d / "model.pt", weights_only=True) for d in ("kill_ref", "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_metrics(base / "kill_ref")[-1]["train_loss"] == read_metrics(base / "killed")[-1]["train_loss"]


# --------------------------------------------------------------------------- model outputs and own losses


def test_a_mapping_output_is_read_by_its_logits_and_the_constructor_takes_a_built_config(tmp_path):
    # The HF-shaped model trained with the launcher's own loss on .logits (targets pre-shifted: Tokens).
    result, _, out = train_inproc(tmp_path, *HF_LIKE, "data.name=tests.user_code:Tokens", "data.batch_size=16", "train.epochs=2")
    assert "model output: the 'logits' of its FakeModelOutput" in out
    assert result["eval_accuracy"] > 0.3


def test_an_own_mean_loss_over_shifted_labels_is_weighted_by_tokens_exactly_under_ddp(two, tmp_path):
    """model.loss_arg=labels, loss_reduction=mean_shifted: the model's mean times its own count of
    (shifted, non-ignored) labels, so 2 ranks whose token counts differ equal one process."""
    own = OWN
    one, w1, out = train_inproc(tmp_path / "one", *own, "data.batch_size=16")
    assert "the model's own (model.loss_arg=labels, a mean over the targets shifted by one" in out
    done(two, "own")
    w2 = torch.load(two[0] / "own" / "model.pt", weights_only=True)
    assert max_diff(w1, w2) <= 1e-5
    rec = read_metrics(two[0] / "own")[-1]
    assert rec["eval_loss"] == pytest.approx(one["eval_loss"], abs=1e-6)
    # the logged eval loss does not depend on the evaluation batch size (a mean of means would)
    again, _, _ = train_inproc(tmp_path / "again", *own, "data.batch_size=16", "data.eval_batch_size=7")
    assert again["eval_loss"] == pytest.approx(one["eval_loss"], abs=1e-6)


@pytest.mark.parametrize("overrides, needle", [
    # a loss(batch) method returning a mean where the contract wants a sum
    (["model.name=tests.user_models:MeanLoss", "data.name=tests.user_code:Regression", "train.loss=mse"], "must return (sum over the batch, element count)"),
    # the model's mean over shifted labels declared as a sum, or as an unshifted mean (labels are padded)
    ([*HF_LIKE, "model.loss_arg=labels", "model.loss_reduction=sum"], "set model.loss_reduction=mean_shifted"),
    ([*HF_LIKE, "model.loss_arg=labels", "model.loss_reduction=mean"], "set model.loss_reduction=mean_shifted"),
])
def test_a_mean_where_a_sum_is_expected_is_one_line(tmp_path, overrides, needle):
    with pytest.raises(UserError) as e:
        train_inproc(tmp_path, *overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_model_outputs_without_a_usable_tensor_name_the_way_out():
    from launch.data.types import model_output

    with pytest.raises(UserError, match=r"no 'logits' tensor.*model.loss_arg \(labels for Hugging Face\)"):
        model_output({"loss": torch.zeros(()), "past_key_values": None})
    with pytest.raises(UserError, match=r"\.logits of a Hugging Face output"):
        model_output("text")
    logits = torch.zeros(2, 3)
    assert model_output((logits, None))[0] is logits and "first element" in model_output((logits, None))[1]


# --------------------------------------------------------------------------- first-hour mistakes


def test_unused_parameters_under_ddp_are_one_line_naming_the_setting(two, tmp_path):
    # the refusal through a real launcher (its exit code and its one line on stderr); the cure as a job
    p = spawn(2, tmp_path, *UNUSED)
    assert p.returncode == 2, output(p)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "spare.weight" in lines[0] and "dist.find_unused_parameters=true" in lines[0], output(p)
    done(two, "unused_ok")


def test_numpy_items_are_accepted_as_default_collate_accepts_them(tmp_path):
    result, _, _ = train_inproc(tmp_path, "model.name=mlp", "model.hidden=[16]", "data.name=tests.user_models:NumpyBlobs",
                                "data.batch_size=16", "train.epochs=10", "log.progress=false", "train.device=cpu")
    assert result["eval_accuracy"] > 0.8
