"""Issue 25: device meshes. HSDP (dist.replicate), tensor parallel from a Hugging Face model's own plan
(dist.tp) and FSDP x TP equal one process at the same global batch (real gloo processes), resume
bitwise at the same mesh and continue the run at another, and refuse sizes that do not divide in one
line before any process group work."""

from __future__ import annotations

import shutil

import pytest
import torch

from launch import config
from launch.checkpoint import store
from launch.errors import UserError
from launch.observe.logger import read_metrics
from launch.processes.dist import DistEnv, Runtime
from tests.helpers import PY, SMALL, output, run
from tests import jobs
from tests.test_models import max_diff, train_inproc

pytest.importorskip("transformers", reason="transformers is not installed (optional: pip install -e '.[hf]')")

# A Llama-architecture model built from its config (no download): 4 heads, 2 key/value heads, 2 layers.
# Its vocabulary of 13 (the sums' characters) does not divide by 2: the embedding's and the output
# head's rows split unevenly. 96 sums a step of 16: 6 optimizer steps.
LLAMA_CONFIG = dict(vocab_size=13, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                    num_hidden_layers=2, max_position_embeddings=16)
LLAMA = ["model.name=transformers:LlamaForCausalLM",
         "model.kwargs={config: {_target_: 'transformers:LlamaConfig', " + ", ".join(f"{k}: {v}" for k, v in LLAMA_CONFIG.items()) + "}}",
         "data.name=launch.examples.sums_lm:SumsDataset", "data.kwargs={n: 96, n_eval: 40}", "data.eval_batch_size=16",
         "train.epochs=1", "train.lr=0.1", "ckpt.every_steps=2", "log.progress=false", "train.device=cpu"]
CLIP = ["train.grad_clip=0.3"]  # active at every step here (the gradient norm is above 1): the global norm over both meshes


def llama_plan(model, tp_mesh) -> None:
    """model.tp_plan=tests.test_mesh:llama_plan: Llama's split written by hand with torch's styles, as a
    user brings one for a model without its own plan."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate()), "lm_head": ColwiseParallel(output_layouts=Replicate())}
    for i in range(len(model.model.layers)):
        plan.update({f"model.layers.{i}.{n}": ColwiseParallel() for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")})
        plan.update({f"model.layers.{i}.{n}": RowwiseParallel() for n in ("self_attn.o_proj", "mlp.down_proj")})
    parallelize_module(model, tp_mesh, plan)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**LLAMA_CONFIG))


@pytest.fixture(scope="module")
def meshes(tmp_path_factory):
    """Every run of this file, made once. In this process: one process at 16 samples a step (without and
    with clipping) and the MLP at 64 a step. On 4 shared gloo ranks (tests/jobs.py): FSDP(2) x TP(2) with
    sequence parallel at 8 per data-parallel rank, HSDP 2 x 2 at 16 each, and HSDP stopped at its step-8
    checkpoint and rerun. On 2 shared ranks: TP(2) at 16 (one data-parallel rank of two TP ranks), TP
    stopped at its step-2 checkpoint and rerun with the user's model.tp_plan, and the HSDP run's step-8
    checkpoint continued as FSDP over 2 ranks at the same global batch (2 x 32)."""
    base = tmp_path_factory.mktemp("meshes")
    with jobs.one_thread():
        one, w1, _ = train_inproc(base / "one", *LLAMA, "data.batch_size=16")
        one_clip, w1c, _ = train_inproc(base / "one_clip", *LLAMA, *CLIP, "data.batch_size=16")
        small, ws, _ = train_inproc(base / "small", *SMALL, "data.batch_size=64")
    at = lambda name: f"run.dir={base / name}"  # noqa: E731
    hsdp = [*SMALL, "data.batch_size=16", "dist.strategy=fsdp", "dist.replicate=2", "ckpt.every_steps=8"]  # saves at 6 (epoch end), 8, 12
    jobs.run_jobs(4, [("fsdp_tp", [*LLAMA, *CLIP, "data.batch_size=8", "dist.tp=2", "dist.strategy=fsdp", "dist.sequence_parallel=true",
                                   "ckpt.every_steps=0", at("fsdp_tp")], ""),  # only the final checkpoint (export reads it)
                      ("hsdp", [*hsdp, at("hsdp")], ""),
                      ("hsdp_cut", [*hsdp, at("hsdp_cut")], "stop:step=8"), ("hsdp_cut", [*hsdp, at("hsdp_cut")], "")], base / "out4")
    shutil.copytree(base / "hsdp", base / "hsdp_fsdp")
    _rewind(base / "hsdp_fsdp", 8)  # mid-epoch 1
    tp = [*LLAMA, "data.batch_size=16", "dist.tp=2"]
    jobs.run_jobs(2, [("tp", [*tp, at("tp")], ""),
                      ("tp_cut", [*tp, at("tp_cut")], "stop:step=2"), ("tp_cut", [*tp, "model.tp_plan=tests.test_mesh:llama_plan", at("tp_cut")], ""),
                      ("hsdp_fsdp", [*SMALL, "data.batch_size=32", "dist.strategy=fsdp", "ckpt.every_steps=8", at("hsdp_fsdp")], "")], base / "out2")
    return base, (one, w1), (one_clip, w1c), (small, ws)


def done(base, out: str, name: str, attempt: int = 1) -> str:
    """Rank 0's log of a shared-rank run that must have ended normally."""
    text = jobs.log(base / out, name, attempt=attempt)
    assert jobs.ended(base / out, name, attempt=attempt)["ended"] == "done", text
    return text


def test_tensor_parallel_and_fsdp_x_tp_equal_one_process(meshes):
    """TP(2): the plan's pairs split over two ranks fed the same samples (counted once: the loss and
    element counts of a group are its first rank's). FSDP(2) x TP(2) with sequence parallel and
    clipping by the global norm over both meshes (torch's clip_grad_norm_ fails across them)."""
    base, (one, w1), (one_clip, w1c), _ = meshes
    text = done(base, "out2", "tp")
    assert "device mesh (data 1 x tp 2)" in text and "the Hugging Face plan of LlamaForCausalLM" in text, text
    text = done(base, "out4", "fsdp_tp")
    assert "device mesh (shard 2 x tp 2): FSDP x TP" in text and "with sequence parallel" in text, text
    assert max_diff(w1, w1c) > 1e-3, "clipping must change this run, or the test proves nothing about it"
    tp, both = (torch.load(base / d / "model.pt", weights_only=True) for d in ("tp", "fsdp_tp"))
    assert max_diff(w1, tp) <= 1e-6
    assert max_diff(w1c, both) <= 1e-6
    for name, ref in (("tp", one), ("fsdp_tp", one_clip)):
        rec = read_metrics(base / name)[-1]
        assert rec["eval_samples"] == 40, name  # every sample once over the data-parallel ranks, not once per TP rank
        assert rec["eval_loss"] == pytest.approx(ref["eval_loss"], abs=1e-6) and rec["eval_accuracy"] == ref["eval_accuracy"], name
        assert rec["train_loss"] == pytest.approx(ref["train_loss"], abs=1e-6), name


def test_model_pt_and_export_are_plain_state_dicts_of_the_unsharded_model(meshes):
    from launch.commands import export

    base = meshes[0]
    for name, out in (("tp", "out2"), ("fsdp_tp", "out4")):
        done(base, out, name)
        final = torch.load(base / name / "model.pt", weights_only=True)
        _llama().load_state_dict(final, strict=True)
        exported = export.weights(export.resolve(str(base / name)))  # the sharded checkpoint read whole, in this process
        assert exported.keys() == final.keys() and all(torch.equal(final[k], exported[k]) for k in final), name


def _rewind(run_dir, step: int) -> None:
    """The run as a kill right after its step-`step` checkpoint leaves it: later checkpoints never written."""
    ckdir = store.checkpoint_dir(run_dir)
    for p in ckdir.iterdir():
        if p.name.startswith("step_") and int(p.name[5:13]) > step:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    (ckdir / store.LATEST).write_text(f"step_{step:08d}.dcp\n")
    (run_dir / "model.pt").unlink()


def test_tensor_parallel_resumes_bitwise_and_continues_on_one_process(meshes, tmp_path):
    """A TP run stopped at its step-2 checkpoint, rerun on the same mesh, the same split given by the
    user's model.tp_plan this time: bitwise the uninterrupted TP run. The TP run's step-2 checkpoint
    continued by one process (dist.tp=1) at the same global batch: the same run within 1e-6 (TP's sums
    split differently: measured 1.5e-8)."""
    base = meshes[0]
    assert jobs.ended(base / "out2", "tp_cut")["ended"] == "stopped", jobs.log(base / "out2", "tp_cut")
    again = done(base, "out2", "tp_cut", attempt=2)
    assert "resumed from" in again and "step_00000002.dcp" in again, again
    assert "tensor parallel over 2 ranks: model.tp_plan=tests.test_mesh:llama_plan" in again, again
    ref, rerun = (torch.load(base / d / "model.pt", weights_only=True) for d in ("tp", "tp_cut"))
    assert all(torch.equal(ref[k], rerun[k]) for k in ref)
    shutil.copytree(base / "tp", tmp_path / "one")
    _rewind(tmp_path / "one", 2)
    with jobs.one_thread():
        _, single, out = train_inproc(tmp_path / "one", *LLAMA, "data.batch_size=16")
    assert "changed on resume at step 2: dist.tp 2 -> 1" in out and "step_00000002.dcp" in out, out
    assert max_diff(ref, single) <= 1e-6


# --------------------------------------------------------------------------- HSDP


def test_hsdp_equals_one_process_resumes_bitwise_and_continues_as_fsdp(meshes):
    """The MLP job: HSDP 2 x 2 on 4 ranks at 16 each = one process at 64 a step; an HSDP run stopped at
    its step-8 checkpoint (mid-epoch 1) and rerun: bitwise; the HSDP run's step-8 checkpoint continued
    as FSDP over 2 ranks at the same global batch (2 x 32): the same run within 1e-6."""
    base, _, _, (one, w1) = meshes
    assert "device mesh (replicate 2 x shard 2): HSDP" in done(base, "out4", "hsdp")
    ref = torch.load(base / "hsdp" / "model.pt", weights_only=True)
    assert max_diff(w1, ref) <= 1e-6
    rec = read_metrics(base / "hsdp")[-1]
    assert rec["eval_loss"] == pytest.approx(one["eval_loss"], abs=1e-6) and rec["eval_samples"] == 100
    assert jobs.ended(base / "out4", "hsdp_cut")["ended"] == "stopped", jobs.log(base / "out4", "hsdp_cut")
    assert "step_00000008.dcp" in done(base, "out4", "hsdp_cut", attempt=2)
    rerun = torch.load(base / "hsdp_cut" / "model.pt", weights_only=True)
    assert all(torch.equal(ref[k], rerun[k]) for k in ref)
    fsdp = done(base, "out2", "hsdp_fsdp")
    assert "written with world size 4, resuming with 2" in fsdp, fsdp
    assert "changed on resume at step 8: dist.replicate '2' -> '1'" in fsdp, fsdp
    assert max_diff(ref, torch.load(base / "hsdp_fsdp" / "model.pt", weights_only=True)) <= 1e-6


# --------------------------------------------------------------------------- one line, before any process group


def _meshed(*overrides, world: int = 2):
    """The mesh strategy as rank 0 of `world` sees it before its mesh exists (no process group here)."""
    from launch.parallel.meshed import Meshed

    cfg = config.load(None, ["train.device=cpu", *overrides])
    return Meshed(cfg, Runtime(DistEnv("torchrun", 0, 0, world, world, "127.0.0.1", 1), torch.device("cpu"), None), lambda m: None)


def _one_line(exc_info, *needles):
    text = str(exc_info.value)
    assert "\n" not in text and all(n in text for n in needles), text


@pytest.mark.parametrize("sizes, t, needle", [
    ({}, 3, "attention heads (num_attention_heads=4) do not divide by 3"),
    ({"num_key_value_heads": 2}, 4, "key/value heads (num_key_value_heads=2) do not divide by 4"),
    ({"num_key_value_heads": 4, "intermediate_size": 130}, 4, "intermediate size (intermediate_size=130) do not divide by 4"),
    (None, 4, "hidden size (hidden_size=66) do not divide by 4"),  # a config of no HF class (HF's own check has heads divide it)
])
def test_sizes_that_do_not_divide_by_tp_are_one_line_each(sizes, t, needle):
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlamaForCausalLM

    if sizes is None:
        model = torch.nn.Linear(2, 2)
        model.config = SimpleNamespace(hidden_size=66)
    else:
        model = LlamaForCausalLM(LlamaConfig(**{**LLAMA_CONFIG, **sizes}))
    with pytest.raises(UserError) as e:
        _meshed(f"dist.tp={t}", world=t).prepare(model, None, None)
    _one_line(e, f"dist.tp={t}:", needle)


def test_mesh_mistakes_are_one_line_before_any_process_group(tmp_path):
    from launch.models.build import NeuralNetwork
    from launch.parallel.mesh import layout

    with pytest.raises(UserError) as e:
        _meshed("dist.tp=2").prepare(NeuralNetwork(4, [8], 2), None, None)
    _one_line(e, "dist.tp=2: NeuralNetwork has no tensor-parallel plan", "set model.tp_plan=pkg.module:fn")
    with pytest.raises(UserError) as e:
        _meshed("dist.tp=2", "dist.sequence_parallel=true").prepare(_llama().model, None, None)  # the base model: no output head
    _one_line(e, "dist.sequence_parallel: the Hugging Face plan of LlamaModel cannot split the sequence")
    env4 = DistEnv("torchrun", 0, 0, 4, 4, "127.0.0.1", 1)
    with pytest.raises(UserError) as e:
        layout(config.load(None, ["dist.strategy=fsdp", "dist.replicate=3"]), env4)
    _one_line(e, "dist.replicate=3: 3 replicas do not divide the 4 data-parallel ranks")
    assert layout(config.load(None, ["dist.strategy=fsdp", "dist.replicate=auto"]), DistEnv("torchrun", 5, 1, 8, 4, "h", 1)).replicate == 2
    for bad, needle in ((["dist.replicate=2"], "applies to dist.strategy=fsdp only"), (["dist.sequence_parallel=true"], "applies with tensor parallelism only"),
                        (["model.tp_plan=mine"], "model.tp_plan: must be empty"), (["dist.tp=0"], "dist.tp: must be > 0")):
        with pytest.raises(UserError, match=needle):
            config.load(None, bad)
    # through the entry point (every launcher's worker): the world size checked before the process group forms
    p = run([PY, "train_single.py", *SMALL, f"run.dir={tmp_path}", "dist.tp=2"], timeout=120)
    assert p.returncode == 2 and p.stderr.strip() == "error: dist.tp=2 does not divide the world size 1: tensor-parallel groups of 2 ranks need a multiple of 2 processes", output(p)
    assert not (tmp_path / "config.yaml").exists()
