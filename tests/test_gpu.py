"""The GPU lane: run where CUDA is present (`python -m pytest -m gpu`), skipped with a reason elsewhere."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.helpers import PY, SMALL, output, run, single, torchrun

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the GPU lane)")]
CUDA = [o for o in SMALL if o != "train.device=cpu"] + ["train.device=cuda"]


def weights(d):
    return torch.load(d / "model.pt", weights_only=True, map_location="cpu")


def test_nccl_one_process_equals_a_plain_process(tmp_path):
    plain = run([PY, "train_single.py", *CUDA, f"run.dir={tmp_path / 'plain'}"], timeout=300)
    group = run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train_ddp.py", *CUDA, f"run.dir={tmp_path / 'nccl'}"], timeout=300)
    assert plain.returncode == 0 and group.returncode == 0, output(plain) + output(group)
    assert "backend=nccl" in group.stdout
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "nccl")
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= 1e-6, k


def test_bitwise_resume_on_cuda(tmp_path):
    ref = run([PY, "train_single.py", *CUDA, "train.momentum=0.9", f"run.dir={tmp_path / 'ref'}"], timeout=300)
    cut = run([PY, "train_single.py", *CUDA, "train.momentum=0.9", f"run.dir={tmp_path / 'cut'}"], timeout=300, LAUNCH_FAULT="stop:step=30")
    again = run([PY, "train_single.py", *CUDA, "train.momentum=0.9", f"run.dir={tmp_path / 'cut'}"], timeout=300)
    assert ref.returncode == 0 and cut.returncode == 75 and again.returncode == 0, output(cut) + output(again)
    a, b = weights(tmp_path / "ref"), weights(tmp_path / "cut")
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_amp_on_cuda(tmp_path, precision):
    p = run([PY, "train_single.py", *CUDA, f"train.precision={precision}", f"run.dir={tmp_path}"], timeout=300)
    assert p.returncode == 0, output(p)
    rec = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert math.isfinite(rec["train_loss"]) and math.isfinite(rec["eval_loss"]) and rec["eval_accuracy"] > 0.6, rec


def test_compile_on_cuda_matches_eager(tmp_path):
    eager = run([PY, "train_single.py", *CUDA, "train.epochs=1", f"run.dir={tmp_path / 'e'}"], timeout=300)
    comp = run([PY, "train_single.py", *CUDA, "train.epochs=1", "train.compile=true", f"run.dir={tmp_path / 'c'}"], timeout=600)
    assert eager.returncode == 0 and comp.returncode == 0, output(comp)
    a, b = weights(tmp_path / "e"), weights(tmp_path / "c")
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= 1e-4, k


@pytest.mark.skipif(torch.cuda.device_count() != 1, reason="needs exactly one visible GPU")
def test_more_processes_than_gpus_is_one_line_first(tmp_path):
    p = torchrun(2, tmp_path, *CUDA, timeout=120)
    assert p.returncode != 0
    assert "2 processes per node but only 1 visible GPU(s)" in p.stderr, output(p)
    spawned = run([PY, "train_ddp.py", "--nproc", "2", *CUDA, f"run.dir={tmp_path / 's'}"], timeout=60, CUDA_VISIBLE_DEVICES="0")
    assert spawned.returncode == 2 and "CUDA_VISIBLE_DEVICES=0" in spawned.stderr.strip().splitlines()[0], output(spawned)


def test_cuda_visible_devices_and_predict_on_cuda(tmp_path):
    p = single(tmp_path, *CUDA, CUDA_VISIBLE_DEVICES="0")
    assert p.returncode == 0 and "device=cuda:0" in p.stdout, output(p)
    pred = run([PY, "-m", "launch", "predict", str(tmp_path), "--device", "cuda", "--eval"], timeout=120)
    assert pred.returncode == 0 and json.loads(pred.stdout)["samples"] == 100, output(pred)
