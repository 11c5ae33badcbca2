"""Issue 17 (points 1, 2, 4, 8): nothing lost and nothing silently wrong in the run directory.
Checksummed checkpoints and model.pt, torn files that no longer block a rerun, the first save's
needs checked before step 1, ckpt.resume=never keeping every file, one-line save errors."""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from launch import config
from launch.commands import cli
from launch.checkpoint import integrity, rundir, store
from launch.errors import UserError
from launch.observe.logger import read_metrics
from launch.processes.dist import DistEnv, setup
from launch.train.loop import train
from tests import jobs
from tests.helpers import PY, ROOT, SMALL, env, output, run

# SMALL: 384 samples, batch 16 -> 24 steps per epoch; a checkpoint per epoch (ckpt.every_epochs=1).


def train_inproc(run_dir, *overrides) -> str:
    """Train in this process (on one thread, as the shared ranks run); return what it printed."""
    cfg = config.load(None, [*SMALL, f"run.dir={run_dir}", *overrides])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), jobs.one_thread():
        train(cfg, setup(cfg, DistEnv("plain")))
    return out.getvalue()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-epoch run: checkpoint step_00000024.pt, model.pt, metrics, config."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train_inproc(run_dir, "train.epochs=1")
    return run_dir


@pytest.fixture
def copy_of(finished, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(finished, target)
    return target


def flip_inside_tensor(path, tensor: torch.Tensor, n: int = 64) -> bytes:
    """Invert `n` bytes in the middle of `tensor`'s data inside the torch zip file `path` (located
    by its bytes, so it is tensor data and nothing else). Returns the damaged file's bytes."""
    raw = bytearray(path.read_bytes())
    wanted = tensor.contiguous().numpy().tobytes()
    assert len(wanted) >= 2 * n
    with zipfile.ZipFile(path) as z:
        hits = [i for i in z.infolist() if z.read(i.filename) == wanted]
    assert len(hits) == 1, "the tensor's data should be one entry of the archive"
    header = hits[0].header_offset
    start = header + 30 + int.from_bytes(raw[header + 26:header + 28], "little") + int.from_bytes(raw[header + 28:header + 30], "little")
    assert raw[start:start + len(wanted)] == wanted
    middle = start + len(wanted) // 2 - n // 2
    raw[middle:middle + n] = bytes(b ^ 0xFF for b in raw[middle:middle + n])
    path.write_bytes(bytes(raw))
    return bytes(raw)


def only_line(text: str, needle: str) -> str:
    lines = [line for line in text.splitlines() if needle in line]
    assert len(lines) == 1, text
    return lines[0]


# --------------------------------------------------------------------------- checksums


def test_bit_flip_in_the_newest_checkpoint_falls_back_and_keeps_the_file(tmp_path):
    """Both runs in this process: what is under test is what a rerun reads, not a process boundary."""
    args = ("train.epochs=3", "train.momentum=0.9")
    train_inproc(tmp_path, *args)  # uninterrupted: checkpoints at steps 24, 48, 72
    reference = torch.load(tmp_path / "model.pt", weights_only=True)
    newest = tmp_path / "checkpoints" / "step_00000072.pt"
    weight = torch.load(newest, weights_only=True)["model"]["linear_relu_stack.1.weight"]
    damaged = flip_inside_tensor(newest, weight)
    assert torch.load(newest, weights_only=True)["step"] == 72, "torch itself loads the damaged file without complaint"

    again = train_inproc(tmp_path, *args)  # the same command
    line = only_line(again, "step_00000072.pt: corrupt")
    assert str(newest) in line and "sha256" in line and "falling back to the previous checkpoint" in line
    assert f"resumed from {tmp_path / 'checkpoints' / 'step_00000048.pt'} (epoch 2, step 48)" in again
    final = torch.load(tmp_path / "model.pt", weights_only=True)
    assert final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)
    kept = list((tmp_path / "checkpoints").glob("step_00000072.pt.corrupt-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == damaged, "the corrupt file is set aside, unchanged"
    assert f"as {kept[0]}" in again
    assert integrity.verify(newest), "step 72 saved again, with a manifest that matches"
    assert [r["step"] for r in read_metrics(tmp_path)] == [24, 48, 72]


def test_predict_refuses_a_flipped_model_pt_in_one_line(finished, tmp_path, capsys):
    """The intact weights evaluate (`launch predict`'s main() in this process); the flipped ones are
    refused by the real command: its exit status, its one stderr line, nothing on stdout."""
    run_dir = tmp_path / "weights"
    run_dir.mkdir()
    for name in ("model.pt", "model.manifest.json", "config.yaml"):
        shutil.copy(finished / name, run_dir / name)
    capsys.readouterr()
    with pytest.raises(SystemExit) as good, jobs.one_thread():
        cli.main(["predict", str(run_dir), "--eval"])
    printed = capsys.readouterr()
    assert good.value.code == 0 and json.loads(printed.out)["loss"] > 0, printed
    weights = torch.load(run_dir / "model.pt", weights_only=True)  # users' plain torch.load keeps working
    flip_inside_tensor(run_dir / "model.pt", weights["linear_relu_stack.1.weight"])
    bad = run([PY, "-m", "launch", "predict", str(run_dir), "--eval"])
    assert bad.returncode == 2, output(bad)
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{run_dir / 'model.pt'}: corrupt" in lines[0], output(bad)
    assert not bad.stdout.strip(), "no evaluation of wrong weights"


# --------------------------------------------------------------------------- torn files


def test_torn_metrics_and_config_are_kept_aside_and_the_rerun_resumes(copy_of):
    metrics = copy_of / "metrics.jsonl"
    torn_line = b'{"epoch": 1, "step": 30, "train_lo'
    metrics.write_bytes(metrics.read_bytes() + torn_line)  # an append cut short
    assert [r["step"] for r in read_metrics(copy_of)] == [24], "read_metrics skips a torn line"
    cfg_text = (copy_of / "config.yaml").read_bytes()
    torn_cfg = cfg_text[: cfg_text.index(b"  lr: 0.1") + len(b"  lr: 0.")]  # cut mid-value: it parses, as lr 0.0
    (copy_of / "config.yaml").write_bytes(torn_cfg)

    out = train_inproc(copy_of, "train.epochs=2")
    assert "resumed from" in out and "(epoch 1, step 24)" in out, out
    line = only_line(out, "torn line")
    side = list(copy_of.glob("metrics.jsonl.torn-*"))
    assert len(side) == 1 and side[0].name in line and side[0].read_bytes() == torn_line + b"\n"
    assert [r["step"] for r in read_metrics(copy_of)] == [24, 48]
    assert json.loads(metrics.read_bytes().splitlines()[-1])["step"] == 48
    kept = list(copy_of.glob("config.yaml.torn-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == torn_cfg
    assert yaml.safe_load((copy_of / "config.yaml").read_text())["train"]["lr"] == 0.1, "written anew, whole"
    assert kept[0].name in only_line(out, "config.yaml was torn")


def test_a_failed_append_leaves_no_torn_line(tmp_path):
    """A metrics record that does not fit (here: the file size limit, as a full disk would) is one
    line naming the file, and the file keeps only whole records: the next append starts clean."""
    script = (
        "import resource, sys\n"
        "from launch.observe.logger import MetricsLog\n"
        "log = MetricsLog(sys.argv[1], True)\n"
        "log.write({'step': 1})\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))\n"
        "try:\n"
        "    log.write({'step': 2, 'note': 'x' * 200})\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    p = run([PY, "-c", script, str(tmp_path)])
    assert p.returncode == 0, output(p)
    assert p.stdout.strip() == f"WriteError cannot append to {tmp_path / 'metrics.jsonl'}: file size limit exceeded (ulimit -f / RLIMIT_FSIZE)"
    assert (tmp_path / "metrics.jsonl").read_bytes() == b'{"step": 1}\n'


@pytest.mark.parametrize("garbage", [b"garbage\n", b"\xff\xfe\x80step_\x00\x9c"], ids=["text", "not-utf8"])
def test_garbage_latest_falls_back_to_the_complete_checkpoints(copy_of, garbage):
    (copy_of / "checkpoints" / "latest").write_bytes(garbage)
    out = train_inproc(copy_of, "train.epochs=2")
    line = only_line(out, "checkpoint pointer")
    assert str(copy_of / "checkpoints" / "latest") in line and "using the newest complete checkpoint" in line
    assert "(epoch 1, step 24)" in out, out
    assert store.read_latest(copy_of / "checkpoints") == "step_00000048.pt"


# --------------------------------------------------------------------------- before step 1


@pytest.mark.parametrize("kind", ["symlink-to-proc", "file"])
def test_unwritable_checkpoints_are_refused_before_step_1(tmp_path, kind):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if kind == "file":
        (run_dir / "checkpoints").write_text("not a directory")
        needle = "exists and is not a directory"
    else:  # root ignores permission bits; /proc takes no new files from anyone
        (run_dir / "checkpoints").symlink_to("/proc/self")
        needle = "(this filesystem takes no new files): the first save would fail"
    with pytest.raises(UserError) as err:
        train_inproc(run_dir)
    message = str(err.value)
    assert "\n" not in message and needle in message and str(run_dir / "checkpoints") in message
    assert not (run_dir / "metrics.jsonl").exists(), "no step was trained"


def test_too_little_space_or_too_low_a_file_size_limit_is_one_line(tmp_path, monkeypatch):
    real = os.statvfs

    def tiny(path):  # the filesystem reports 4 KiB free
        st = real(path)
        return os.statvfs_result((st.f_bsize, 4096, 1000, 1, 1, st.f_files, st.f_ffree, st.f_favail, st.f_flag, st.f_namemax))

    monkeypatch.setattr(os, "statvfs", tiny)
    with pytest.raises(UserError) as err:
        train_inproc(tmp_path / "a")
    needed = (16 * 32 + 32 + 32 * 16 + 16 + 16 * 2 + 2) * 4  # SMALL's parameters, SGD without momentum
    assert "\n" not in str(err.value)
    assert f"not enough free space for a checkpoint in {tmp_path / 'a' / 'checkpoints'}: 4,096 bytes free, about {needed:,} bytes needed" in str(err.value)
    assert not (tmp_path / "a" / "metrics.jsonl").exists()
    monkeypatch.setattr(os, "statvfs", real)
    monkeypatch.setattr(rundir, "_file_size_limit", lambda: 1000)
    with pytest.raises(UserError) as err:
        train_inproc(tmp_path / "b", "train.optimizer=adamw")
    assert f"the file size limit (ulimit -f) is 1,000 bytes, below the about {3 * needed:,} bytes of one checkpoint" in str(err.value)


# --------------------------------------------------------------------------- ckpt.resume=never, save errors


def test_resume_never_moves_the_whole_previous_run_aside_byte_identical(copy_of):
    (copy_of / "notes.txt").write_text("the user's own file")
    before = {p.relative_to(copy_of): p.read_bytes() for p in copy_of.rglob("*") if p.is_file() and p.name != ".lock"}
    out = train_inproc(copy_of, "ckpt.resume=never", "train.epochs=1")
    moved = list(copy_of.glob("previous-*"))
    assert len(moved) == 1 and str(moved[0]) in only_line(out, "ckpt.resume=never")
    for rel, data in before.items():
        where = copy_of / rel if rel.name == "notes.txt" else moved[0] / rel
        assert where.read_bytes() == data, f"{rel} must be kept unchanged"
    assert (copy_of / "model.pt").exists() and [r["step"] for r in read_metrics(copy_of)] == [24]
    train_inproc(copy_of, "ckpt.resume=never", "train.epochs=1")  # again: a second folder, the first left alone
    assert len(list(copy_of.glob("previous-*"))) == 2 and (moved[0] / "model.pt").read_bytes() == before[Path("model.pt")]


def test_a_save_under_a_file_size_limit_is_one_line_and_keeps_the_previous_checkpoint(copy_of):
    ckdir = copy_of / "checkpoints"
    limit = (ckdir / "step_00000024.pt").stat().st_size // 2  # above the tensor bytes estimate, below a checkpoint
    p = subprocess.run(
        [PY, "train_single.py", *SMALL, f"run.dir={copy_of}", "train.epochs=2"], cwd=ROOT, env=env(), capture_output=True, text=True,
        timeout=120, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    assert p.returncode == 2, output(p)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, output(p)
    assert f"cannot write checkpoint {ckdir / 'step_00000048.pt'}: file size limit" in lines[0]
    assert f"{ckdir / 'latest'} still names step_00000024.pt" in lines[0]
    assert "(epoch 1, step 24)" in p.stdout
    assert store.read_latest(ckdir) == "step_00000024.pt"
    assert integrity.verify(ckdir / "step_00000024.pt") and store.load(ckdir / "step_00000024.pt")["step"] == 24
    assert sorted(f.name for f in ckdir.iterdir()) == ["latest", "step_00000024.manifest.json", "step_00000024.pt"]
