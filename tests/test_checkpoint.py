"""Issue 3: checkpoints never lose work, and resuming gives the same result as not stopping."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import time

import pytest
import torch

from launch import config
from launch.checkpoint import store
from launch.errors import EXIT_STOPPED
from launch.models.build import NeuralNetwork, clean_state_dict
from launch.processes import dist as dist_mod
from launch.processes.stopping import Stopped
from launch.train.loop import train
from tests import jobs
from tests.helpers import PY, ROOT, SMALL, env, output, single, torchrun

# SMALL: 384 samples, batch 16 -> 24 steps per epoch single, 12 per epoch with 2 ranks, 8 with 3.
EPOCHS3 = "train.epochs=3"
MOMENTUM = (EPOCHS3, "train.momentum=0.9")
DDP_CUT = (*MOMENTUM, "ckpt.every_steps=5", "train.check_every_steps=1")
FROM3 = (EPOCHS3, "train.check_every_steps=1")
GLOBAL = (EPOCHS3, "train.global_batch=48", "data.batch_size=32", "train.momentum=0.9", "train.check_every_steps=1")


def here(run_dir, *overrides, fault: str = ""):
    """`python train_single.py SMALL run.dir=RUN_DIR OVERRIDES` in this process, where no process boundary
    is under test (the same loop; one thread, as OMP_NUM_THREADS=1 gives the subprocess). A fault is this
    run's LAUNCH_FAULT. Returns (the Stopped it ended with or None, what it printed)."""
    cfg = config.load(None, [*SMALL, f"run.dir={run_dir}", *overrides])
    out, ended = io.StringIO(), None
    os.environ["LAUNCH_FAULT"] = fault
    try:
        with jobs.one_thread(), contextlib.redirect_stdout(out):
            train(cfg, dist_mod.setup(cfg, dist_mod.DistEnv("plain")))
    except Stopped as e:
        ended = e
    finally:
        os.environ.pop("LAUNCH_FAULT", None)
    return ended, out.getvalue()


def final_state(run_dir):
    """The final checkpoint (latest) and weights of a finished run."""
    ck = store.checkpoint_dir(run_dir)
    latest = store.read_latest(ck)
    return torch.load(ck / latest, weights_only=True), torch.load(run_dir / "model.pt", weights_only=True)


def assert_same_training_state(a_dir, b_dir):
    (ca, wa), (cb, wb) = final_state(a_dir), final_state(b_dir)
    assert ca["step"] == cb["step"]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"parameter {k} differs"
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k])
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys() and sa, "optimizer state must be saved (momentum buffers)"
    for i in sa:
        for name, value in sa[i].items():
            assert torch.equal(value, sb[i][name]), f"optimizer state {i}.{name} differs"
    assert ca["scheduler"] == cb["scheduler"]


def steps_in_metrics(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted single-process run to compare against, momentum on."""
    base = tmp_path_factory.mktemp("ref")
    ended, out = here(base / "single", *MOMENTUM)
    assert ended is None, out
    return base


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """Every multi-process training run of this file on one set of 2 and one of 3 spawned gloo ranks
    (tests/jobs.py; each a fresh run, resumed from disk): the uninterrupted 2- and 3-rank references
    (ckpt.every_steps=5), the stopped-and-rerun runs, the global-batch runs and the 2-rank continuation
    of a 3-rank checkpoint. That checkpoint comes first, from a real torchrun (how a stop ends under
    torchrun is asserted on it). Returns (base, the torchrun process)."""
    base = tmp_path_factory.mktemp("ddp")
    stop3 = torchrun(3, base / "a", *FROM3, LAUNCH_FAULT="stop:step=12")  # mid-epoch 1 (8 steps per epoch)
    at = lambda name: f"run.dir={base / name}"  # noqa: E731
    ref = lambda name: [*SMALL, *MOMENTUM, "ckpt.every_steps=5", at(name)]  # noqa: E731
    cut = lambda name: [*SMALL, *DDP_CUT, at(name)]  # noqa: E731
    gb = lambda name: [*SMALL, *GLOBAL, at(name)]  # noqa: E731
    jobs.run_jobs(2, [("ddp2", ref("ddp2"), ""), ("cut2", cut("cut2"), "stop:step=17"), ("cut2", cut("cut2"), ""),
                      ("from3", [*SMALL, *FROM3, f"ckpt.resume={base / 'a' / 'checkpoints' / 'step_00000012.pt'}", at("from3")], ""),
                      ("gb_ref", gb("gb_ref"), ""), ("gb_run", gb("gb_run"), "stop:step=11")], base / "out2")
    jobs.run_jobs(3, [("ddp3", ref("ddp3"), ""), ("cut3", cut("cut3"), "stop:step=11"), ("cut3", cut("cut3"), ""),
                      ("gb_run", gb("gb_run"), "")], base / "out3")
    return base, stop3


@pytest.mark.parametrize("stop_step,where", [(24, "after epoch 0"), (30, "mid-epoch 1")])
def test_stop_and_rerun_is_bitwise_identical_single(reference, tmp_path, stop_step, where):
    args = (*MOMENTUM, "train.check_every_steps=1")
    first, out = here(tmp_path, *args, fault=f"stop:step={stop_step}")
    assert first is not None and first.code == EXIT_STOPPED, out
    assert f"at step {stop_step} ({where})" in str(first)
    assert store.read_latest(store.checkpoint_dir(tmp_path)) == f"step_{stop_step:08d}.pt"
    second, out = here(tmp_path, *args)  # the same command again
    assert second is None, out
    assert f"resumed from {tmp_path / 'checkpoints' / f'step_{stop_step:08d}.pt'}" in out
    assert_same_training_state(tmp_path, reference / "single")
    assert steps_in_metrics(tmp_path) == [24, 48, 72], "one metrics record per epoch, none duplicated"


@pytest.mark.parametrize("ranks,stop_step", [(2, 17), (3, 11)])
def test_stop_mid_epoch_and_rerun_is_bitwise_identical_ddp(ddp, ranks, stop_step):
    """From three ranks on, gloo's sum of an element depends on where it lies in DDP's gradient bucket:
    a resumed run must use the same bucket layout as the uninterrupted one from its first step on
    (launch.parallel.ddp.settle_buckets); without it the 3-rank run is off by 6e-8."""
    base, _ = ddp
    out, name = base / f"out{ranks}", f"cut{ranks}"
    first = jobs.ended(out, name)
    assert first["ended"] == "stopped" and first["code"] == EXIT_STOPPED, jobs.log(out, name)
    assert f"at step {stop_step} (mid-epoch 1)" in first["message"]
    assert jobs.ended(out, name, attempt=2)["ended"] == "done", jobs.log(out, name, attempt=2)
    assert f"(epoch 1, step {stop_step})" in jobs.log(out, name, attempt=2)
    assert_same_training_state(base / name, base / f"ddp{ranks}")


def test_elastic_restart_resumes_from_latest(ddp, tmp_path):
    """kill -9 one rank; torchrun restarts the group, which resumes instead of starting at step 0."""
    p = torchrun(
        2, tmp_path, EPOCHS3, "train.momentum=0.9", "ckpt.every_steps=5",
        torchrun_args=("--max-restarts=2",), LAUNCH_FAULT="kill:step=22:rank=1:attempt=0", timeout=180,
    )
    assert p.returncode == 0, output(p)
    assert "torchrun restart 1 (TORCHELASTIC_RESTART_COUNT)" in p.stdout
    assert "resumed from" in p.stdout and "(epoch 1, step 20)" in p.stdout
    assert_same_training_state(tmp_path, ddp[0] / "ddp2")


def test_kill_during_save_keeps_previous_checkpoint(reference, tmp_path):
    args = [PY, "train_single.py", *SMALL, f"run.dir={tmp_path}", EPOCHS3, "train.momentum=0.9", "ckpt.every_steps=0"]
    proc = subprocess.Popen(args, cwd=ROOT, env=env(LAUNCH_FAULT="stall_save:step=48:seconds=120"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckdir = tmp_path / "checkpoints"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(ckdir.glob(".step_00000048.pt.tmp-*")):
        time.sleep(0.05)
    assert list(ckdir.glob(".step_00000048.pt.tmp-*")), "the writer should be stalled before its rename"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert not (ckdir / "step_00000048.pt").exists(), "no half-written file under a final name"
    assert store.read_latest(ckdir) == "step_00000024.pt"
    store.load(ckdir / "step_00000024.pt")  # the previous checkpoint is intact
    ended, out = here(tmp_path, *MOMENTUM, "ckpt.every_steps=0")  # the same command again (in this process)
    assert ended is None, out
    assert "(epoch 1, step 24)" in out
    assert not list(ckdir.glob(".*.tmp-*")), "stale temporaries are cleaned up"
    assert_same_training_state(tmp_path, reference / "single")


def test_truncated_newest_falls_back_to_previous(reference, tmp_path):
    args = (*MOMENTUM, "train.check_every_steps=1")
    first, out = here(tmp_path, *args, "ckpt.every_steps=10", fault="stop:step=40")
    assert first is not None and first.code == EXIT_STOPPED, out
    newest = tmp_path / "checkpoints" / "step_00000040.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    second, out = here(tmp_path, *args, "ckpt.every_steps=10")
    assert second is None, out
    assert f"checkpoint {newest}: unreadable" in out and "falling back to the previous checkpoint" in out
    assert "(epoch 1, step 30)" in out
    assert_same_training_state(tmp_path, reference / "single")


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {Payload.marker}",))


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    Payload.marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": store.FORMAT, "model": Payload()}, evil)
    p = single(tmp_path / "run", f"ckpt.resume={evil}", timeout=60)
    assert p.returncode == 2, output(p)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and str(evil) in lines[0] and "pickled Python object" in lines[0], output(p)
    assert not Payload.marker.exists(), "the payload must not execute"
    assert evil.stat().st_size > 0, "nothing overwritten"


@pytest.mark.parametrize("kind", ["foreign", "truncated", "shape"])
def test_bad_checkpoint_given_explicitly_names_file_and_reason(reference, tmp_path, kind):
    # In-process (the one-line/exit-2 path itself is covered by the pickle test above).
    src = reference / "single" / "checkpoints" / store.read_latest(reference / "single" / "checkpoints")
    bad = tmp_path / "bad.pt"
    if kind == "foreign":
        torch.save({"weights": torch.zeros(3)}, bad)
        needle = "not a launch checkpoint"
    elif kind == "truncated":
        bad.write_bytes(src.read_bytes()[:500])
        needle = "unreadable (truncated or not a torch file"
    else:
        bad.write_bytes(src.read_bytes())
        needle = "does not fit this model (Error(s) in loading state_dict"
    extra = ["model.hidden=[8]"] if kind == "shape" else []
    cfg = config.load(None, [*SMALL, f"run.dir={tmp_path / 'run'}", f"ckpt.resume={bad}", *extra])
    with pytest.raises(store.CheckpointError) as err:
        train(cfg, dist_mod.setup(cfg, dist_mod.DistEnv("plain")))
    message = str(err.value)
    assert "\n" not in message and needle in message and str(bad) in message
    assert bad.stat().st_size > 0 and not (tmp_path / "run" / "checkpoints").exists()


def test_ddp_checkpoint_resumes_in_single_process_and_other_world_size(ddp, tmp_path):
    base, first = ddp  # stopped by torchrun at 3 ranks, mid-epoch 1 (8 steps per epoch)
    assert first.returncode == 0, output(first)  # under torchrun a stop exits 0 (a failure would be restarted)
    assert "stopped by SIGTERM at step 12 (mid-epoch 1); checkpoint saved" in first.stderr, output(first)
    assert "stopped by SIGTERM at step 12" in (base / "a" / "STOPPED").read_text()
    ck = store.load(base / "a" / "checkpoints" / "step_00000012.pt")
    assert ck["world_size"] == 3 and ck["samples_in_epoch"] == 4 * 16 * 3
    # the same checkpoint, continued by one process (here) and by two (the 2-rank jobs)
    ended, out = here(tmp_path / "single", *FROM3, f"ckpt.resume={base / 'a' / 'checkpoints' / 'step_00000012.pt'}")
    assert ended is None, out
    assert jobs.ended(base / "out2", "from3")["ended"] == "done", jobs.log(base / "out2", "from3")
    for k, text, run_dir in ((1, out, tmp_path / "single"), (2, jobs.log(base / "out2", "from3"), base / "from3")):
        assert "written with world size 3" in text
        assert "(epoch 1, step 12)" in text
        # the same 16 per process: a smaller global batch, named as the change it is
        assert f"the global batch 48 (16 per process x 3 process(es) x 1 accumulation step(s)) -> {16 * k} (16 per process x {k}" in text, text
        NeuralNetwork(16, [32, 16], 2).load_state_dict(torch.load(run_dir / "model.pt", weights_only=True), strict=True)


def test_global_batch_continues_the_same_run_at_another_world_size(ddp):
    """train.global_batch: stopped at 2 ranks (24 per process), resumed at 3 (16 per process), the
    run takes the same steps on the same samples as the uninterrupted one (summed in another order)."""
    base, _ = ddp
    out2, out3 = base / "out2", base / "out3"
    assert jobs.ended(out2, "gb_ref")["ended"] == "done", jobs.log(out2, "gb_ref")
    assert "train.global_batch=48 over 2 process(es): 24 per process x 1 accumulation step(s)" in jobs.log(out2, "gb_ref")
    assert jobs.ended(out2, "gb_run")["ended"] == "stopped" and jobs.ended(out2, "gb_run")["code"] == EXIT_STOPPED, jobs.log(out2, "gb_run")
    assert jobs.ended(out3, "gb_run")["ended"] == "done", jobs.log(out3, "gb_run")
    second = jobs.log(out3, "gb_run")
    assert "(epoch 1, step 11)" in second and "16 per process x 1 accumulation step(s)" in second
    assert "changed on resume" not in second, "the same global batch is not a change"
    (ca, wa), (cb, wb) = final_state(base / "gb_ref"), final_state(base / "gb_run")
    assert ca["step"] == cb["step"] == 24
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6


def test_global_batch_splits_into_the_fewest_accumulation_steps():
    from launch.config.batch import split
    from launch.errors import UserError

    assert split(48, 2, 32) == (24, 1) and split(48, 3, 32) == (16, 1) and split(48, 1, 32) == (24, 2)
    assert split(48, 4, 5) == (4, 3) and split(7, 1, 3) == (1, 7)
    with pytest.raises(UserError, match="does not divide over 5 processes"):
        split(48, 5, 32)


def test_checkpoint_is_plain_tensors_and_prefix_free(ddp):
    ck_dir = ddp[0] / "ddp2" / "checkpoints"
    ck = torch.load(ck_dir / store.read_latest(ck_dir), weights_only=True)  # raises if anything is pickled
    for key in ("model", "optimizer", "scheduler", "epoch", "step", "samples_in_epoch", "rng", "config", "world_size"):
        assert key in ck
    assert set(ck["rng"]) >= {"torch", "python"}
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"])
    assert len(list(ck_dir.glob("step_*.pt"))) == 3, "ckpt.keep_last=3 prunes older checkpoints"


def test_compiled_model_state_loads_into_uncompiled():
    model = NeuralNetwork(4, [8], 2)
    compiled = torch.compile(model)  # wrapping is enough: the keys gain _orig_mod.
    ddp_like = {f"module.{k}": v for k, v in compiled.state_dict().items()}
    assert any(k.startswith("module._orig_mod.") for k in ddp_like)
    fresh = NeuralNetwork(4, [8], 2)
    fresh.load_state_dict(clean_state_dict(ddp_like), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_foreign_run_directory_is_refused_and_never_overwritten(reference, tmp_path):
    import shutil

    shutil.copytree(reference / "single", tmp_path / "run")
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    p = single(tmp_path / "run", EPOCHS3, "train.seed=7", "train.lr=0.3")  # the LR may change on a resume, the seed may not
    assert p.returncode == 2, output(p)
    assert "holds a run with a different config (train.seed: 0 -> 7)" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before
    # told to start fresh: the previous run is moved aside as a whole, never deleted (tests/test_integrity.py checks every file)
    ended, out = here(tmp_path / "run", "train.epochs=1", "train.lr=0.3", "ckpt.resume=never")
    assert ended is None, out
    assert "resumed from" not in out
    moved = list((tmp_path / "run").glob("previous-*"))
    assert len(moved) == 1 and sorted(p.name for p in (moved[0] / "checkpoints").iterdir()) == before


def test_a_checkpoint_written_before_the_restructure_resumes_after_it(tmp_path):
    """tests/fixtures/pre_split_run: a run stopped mid-epoch 1 at step 30 by the loop as it was
    before it was split into modules (SMALL, single process, CPU). Resuming it now must finish the
    run with the weights that loop reached uninterrupted (tests/fixtures/pre_split_model.pt).

    Bitwise only on the CPU kind the fixture was made on: torch picks its kernels by CPU capability
    (AVX2 vs AVX512 round float sums differently, 3e-8 here), so other machines are held to 1e-6,
    far below what a wrong resume point, order or optimizer state gives (1e-2 and up)."""
    import shutil

    fixtures = ROOT / "tests" / "fixtures"
    shutil.copytree(fixtures / "pre_split_run", tmp_path / "run")
    ended, out = here(tmp_path / "run", "train.device=cpu")  # `python train_single.py SMALL`, in this process
    assert ended is None, out
    assert "resumed from" in out and "step 30" in out
    old = torch.load(fixtures / "pre_split_model.pt", weights_only=True)
    new = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert old.keys() == new.keys()
    for k in old:
        assert (old[k] - new[k]).abs().max() <= 1e-6, k
