"""Real datasets (csv, npz, mnist), the shipped dataset, logging extras, plot and predict.

Training runs on files the tests write: one process in this one, 2 ranks as real spawned gloo ranks
(tests/jobs.py); `launch predict` and `launch plot` run their command lines in this process. What a
command line does with bad input (one line, exit 2) is checked on real processes; loader details are
checked in-process on real files."""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import math

import numpy as np
import pytest
import torch

from launch import config as config_mod
from launch.data.build import build_data as build
from launch.errors import UserError
from launch.processes.dist import DistEnv, setup
from launch.train.loop import train
from tests import jobs
from tests.helpers import PY, ROOT, output, run
from tests.test_models import launch_inproc

SHIPPED = ["--config", "configs/breast_cancer.yaml", "ckpt.resume=never", "train.device=cpu"]
SHIPPED_FLOOR = 0.90  # it reaches 0.96-0.98 (single and DDP); the floor only has to catch a broken pipeline


def last_epoch(run_dir) -> dict:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval_loss" in l][-1]


def latest_checkpoint(run_dir) -> dict:
    ck = run_dir / "checkpoints"
    return torch.load(ck / (ck / "latest").read_text().strip(), weights_only=True)


def one_error_line(p) -> str:
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), output(p)
    return lines[0]


def predict(*args):
    return launch_inproc("predict", *args)


def write_species_csv(path, n=240, seed=0):
    """Three string classes in 4-D clusters; f4 on a large scale so standardisation matters; an id column to ignore."""
    rng = np.random.default_rng(seed)
    names = ["cat", "ant", "bee"]  # not sorted: the mapping must sort them
    centres = np.array([[0, 0, 0, 0], [3, 0, 3, 0], [0, 3, 0, 3]], dtype=float)
    rows = []
    for i in range(n):
        k = i % 3
        f = centres[k] + rng.normal(0, 0.7, 4)
        f[3] *= 1000.0
        rows.append([f"id{i}", *[f"{v:.5f}" for v in f], names[k]])
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "f1", "f2", "f3", "f4", "species"])
        w.writerows(rows)
    return rows


SPECIES = ["data.name=csv", "data.target=species", "data.ignore=[id]", "data.val_fraction=0.25", "data.seed=7", "model.hidden=[16]",
           "data.batch_size=16", "train.epochs=4", "train.device=cpu"]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """The `train_ddp.py --nproc 2` runs of this file, as jobs on one pair of spawned gloo ranks: the
    shipped dataset (bc2) and the species CSV (run). Returns (their directory, the CSV's rows)."""
    base = tmp_path_factory.mktemp("data_two")
    rows = write_species_csv(base / "species.csv")
    jobs.run_jobs(2, [("bc2", [*SHIPPED, f"run.dir={base / 'bc2'}"], ""),
                      ("run", [*SPECIES, f"data.path={base / 'species.csv'}", f"run.dir={base / 'run'}"], "")], base / "out")
    return base, rows


def done(two, name: str):
    base = two[0]
    assert jobs.ended(base / "out", name)["ended"] == "done", jobs.log(base / "out", name)
    return base / name


# --------------------------------------------------------------------------- the shipped dataset


def test_shipped_dataset_single_with_tensorboard_plot_and_eval_only(tmp_path):
    run_dir = tmp_path / "bc"
    cfg = config_mod.load(SHIPPED[1], [*SHIPPED[2:], f"run.dir={run_dir}", "log.tensorboard=true", "log.every_steps=10"])
    out = io.StringIO()
    with jobs.one_thread(), contextlib.redirect_stdout(out):  # `python train_single.py --config ...`, in this process
        train(cfg, setup(cfg, DistEnv("plain")))
    rec = last_epoch(run_dir)
    assert rec["eval_accuracy"] >= SHIPPED_FLOOR and rec["eval_samples"] == 114, rec  # 20% of 569 held out
    assert rec["rss_mb"] > 50 and rec["cpu_percent"] > 0 and rec["grad_norm"] > 0, rec
    assert "rss" in out.getvalue() and "cpu" in out.getvalue()  # the epoch line carries them too
    # log.every_steps: step records at steps 10, 20, ... between the epoch records
    steps = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if "train_loss_step" in l]
    assert [s["step"] for s in steps] == list(range(10, rec["step"] + 1, 10))
    # TensorBoard scalars, one point per epoch for the epoch-level tags
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("loss/train", "loss/eval", "accuracy/eval", "lr", "throughput/samples_per_s", "grad_norm", "resources/rss_mb", "loss/train_step"):
        assert tag in tags, tags
    assert [e.value for e in acc.Scalars("accuracy/eval")][-1] == pytest.approx(rec["eval_accuracy"])
    assert len(acc.Scalars("loss/eval")) == 10
    # eval-only from the run directory reproduces the run's final eval metrics
    q = predict(run_dir, "--eval")
    assert q.returncode == 0, output(q)
    got = json.loads(q.stdout.strip().splitlines()[-1])
    assert got["samples"] == rec["eval_samples"] and got["accuracy"] == rec["eval_accuracy"]
    assert math.isclose(got["loss"], rec["eval_loss"], rel_tol=1e-6), (got, rec)
    # launch plot writes a PNG
    png = tmp_path / "curves.png"
    q = launch_inproc("plot", run_dir, "-o", png)
    assert q.returncode == 0, output(q)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_shipped_dataset_ddp(two):
    run_dir = done(two, "bc2")
    rec = last_epoch(run_dir)
    assert rec["world_size"] == 2 and rec["eval_samples"] == 114
    assert rec["eval_accuracy"] >= SHIPPED_FLOOR, rec
    assert rec["rss_mb"] > 100, rec  # summed over two processes, each holding torch (> 50 MB)
    assert "grad_norm" not in rec  # only computed for TensorBoard


# --------------------------------------------------------------------------- csv


def test_csv_string_labels_ddp_mapping_scaler_and_predict(two, tmp_path):
    rows = two[1]
    run_dir = done(two, "run")
    state = latest_checkpoint(run_dir)["data_state"]  # loads with weights_only=True: plain types only
    assert state["class_names"] == ["ant", "bee", "cat"] and state["target"] == "species"
    assert state["feature_columns"] == ["f1", "f2", "f3", "f4"]
    # scaler: statistics of the training rows only (the documented seeded split), not of the whole file
    x = np.array([[float(v) for v in r[1:5]] for r in rows])
    n_val = round(len(x) * 0.25)
    train_rows = torch.randperm(len(x), generator=torch.Generator().manual_seed(7))[n_val:].numpy()
    np.testing.assert_allclose(state["mean"], x[train_rows].mean(0), rtol=1e-9)
    np.testing.assert_allclose(state["std"], x[train_rows].std(0), rtol=1e-9)
    assert not np.allclose(state["mean"], x.mean(0), rtol=1e-9)

    # predict on a features-only file with the columns in another order: original labels come back
    feats = tmp_path / "features.csv"
    with open(feats, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["f4", "f3", "f2", "f1"])
        w.writerows([[r[4], r[3], r[2], r[1]] for r in rows])
    out = tmp_path / "pred.csv"
    q = predict(run_dir, "--input", feats, "--output", out)
    assert q.returncode == 0, output(q)
    pred = list(csv.DictReader(open(out)))
    assert len(pred) == len(rows) and list(pred[0]) == ["row", "prediction", "prob_ant", "prob_bee", "prob_cat"]
    for r in pred:
        assert abs(sum(float(r[f"prob_{c}"]) for c in ("ant", "bee", "cat")) - 1) < 1e-4
        assert r["prediction"] == max(("ant", "bee", "cat"), key=lambda c: float(r[f"prob_{c}"]))
    agree = np.mean([r["prediction"] == row[5] for r, row in zip(pred, rows)])
    assert agree > 0.85, agree  # a wrong index->label mapping would score ~0.33
    # eval-only of this DDP-trained run (one process) matches its last record
    q = predict(run_dir, "--eval")
    got, rec = json.loads(q.stdout.strip().splitlines()[-1]), last_epoch(run_dir)
    assert got["samples"] == rec["eval_samples"] == 60 and got["accuracy"] == rec["eval_accuracy"]
    assert math.isclose(got["loss"], rec["eval_loss"], rel_tol=1e-6), (got, rec)


def csv_cfg(path, *extra):
    return config_mod.load(None, ["data.name=csv", f"data.path={path}", *extra])


def test_csv_headerless_integer_labels_and_separate_val_file(tmp_path):
    tr, ev = tmp_path / "tr.csv", tmp_path / "ev.csv"
    tr.write_text("".join(f"{i % 7},{(i * 3) % 5},{10 if i % 2 else 9}\n" for i in range(40)))
    ev.write_text("1,2,9\n3,4,10\n")
    b = build(csv_cfg(tr, "data.header=false", "data.target=-1", f"data.val_path={ev}", "data.standardize=false"))
    assert b.state["class_names"] == ["9", "10"]  # integers sort numerically
    assert len(b.train) == 40 and len(b.eval) == 2 and b.in_features == 2
    assert b.eval.y.tolist() == [0, 1] and b.eval.x.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert "mean" not in b.state


@pytest.mark.parametrize("content, extra, expect", [
    ("a,b,y\n1,2,x\n3,4,z\n", ["data.target=label"], "no column 'label'"),
    ("a,b,y\n1,2,x\n3,oops,z\n", ["data.target=y"], "line 3, column 'b': feature value 'oops'"),
    ("a,b,y\n1,2,x\n3,z\n", ["data.target=y"], "line 3: 2 fields, expected 3"),
    ("a,b,y\n1,2,x\n3,4,x\n", ["data.target=y"], "single class"),
])
def test_csv_bad_input_names_file_and_column(tmp_path, content, extra, expect):
    f = tmp_path / "bad.csv"
    f.write_text(content)
    with pytest.raises(UserError, match=expect) as e:
        build(csv_cfg(f, *extra))
    assert "\n" not in str(e.value)


def test_bad_csv_from_the_command_line_is_one_line_exit_2(tmp_path):
    f = tmp_path / "bad.csv"
    f.write_text("a,b,y\n1,2,x\n3,4,z\n")
    line = one_error_line(run([PY, "train_single.py", "data.name=csv", f"data.path={f}", "data.target=label", f"run.dir={tmp_path / 'r'}", "train.device=cpu"]))
    assert str(f) in line and "'label'" in line
    assert not (tmp_path / "r").exists()  # nothing written


# --------------------------------------------------------------------------- npz


def test_npz_keys_shapes_and_string_labels(tmp_path):
    f = tmp_path / "d.npz"
    x = np.arange(60, dtype=np.float32).reshape(20, 3)
    np.savez(f, feats=x, lab=np.array(["no", "yes"] * 10))
    b = build(config_mod.load(None, ["data.name=npz", f"data.path={f}", "data.x_key=feats", "data.y_key=lab", "data.val_fraction=0.25"]))
    assert (len(b.train), len(b.eval), b.in_features, b.num_classes) == (15, 5, 3, 2)
    assert b.state["class_names"] == ["no", "yes"]
    torch.testing.assert_close(b.train.x.mean(0), torch.zeros(3), atol=1e-5, rtol=0)  # standardised on train
    np.savez(tmp_path / "bad.npz", x=x, y=np.zeros(19, dtype=np.int64))
    with pytest.raises(UserError, match="'y' has shape \\(19,\\) but 'x' has 20 samples"):
        build(config_mod.load(None, ["data.name=npz", f"data.path={tmp_path / 'bad.npz'}"]))
    with pytest.raises(UserError, match="no array 'x'"):
        build(config_mod.load(None, ["data.name=npz", f"data.path={f}"]))


# --------------------------------------------------------------------------- mnist


def write_idx(path, array: np.ndarray, gz: bool):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files_raw_and_gzip(tmp_path, gz):
    rng = np.random.default_rng(0)
    imgs = {"train": rng.integers(0, 256, (12, 28, 28)), "t10k": rng.integers(0, 256, (5, 28, 28))}
    labels = {"train": np.arange(12) % 10, "t10k": np.array([9, 0, 1, 2, 3])}
    for split in ("train", "t10k"):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte", imgs[split], gz)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte", labels[split], gz)
    b = build(config_mod.load(None, ["data.name=mnist", f"data.path={tmp_path}"]))
    assert b.train.x.shape == (12, 784) and b.eval.x.shape == (5, 784) and b.in_features == 784 and b.num_classes == 10
    expected = (torch.tensor(imgs["train"].reshape(12, 784), dtype=torch.float32) / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(b.train.x, expected)
    assert b.eval.y.tolist() == [9, 0, 1, 2, 3] and b.train.y.dtype == torch.long
    assert b.state["mean"] == 0.1307 and b.state["std"] == 0.3081


def test_mnist_missing_and_truncated_files(tmp_path):
    line = one_error_line(run([PY, "train_single.py", "--config", "configs/mnist.yaml", f"data.path={tmp_path / 'nowhere'}", f"run.dir={tmp_path / 'r'}"]))
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert name in line
    assert "nothing is downloaded" in line
    for split, n in (("train", 3), ("t10k", 2)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte", np.zeros((n, 28, 28)), False)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte", np.zeros(n), False)
    bad = tmp_path / "t10k-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-10])
    with pytest.raises(UserError, match="truncated"):
        build(config_mod.load(None, ["data.name=mnist", f"data.path={tmp_path}"]))


# --------------------------------------------------------------------------- predict refusals, optional extras, config


def test_predict_refuses_pickled_foreign_and_garbage_files(tmp_path):
    import argparse
    import pickle

    from launch.checkpoint.store import CheckpointError
    from launch.commands.predict import load_source

    # A pickled Python object (any global that is not a tensor type) must be refused, never executed.
    torch.save({"format": "launch-checkpoint/1", "model": argparse.Namespace(evil=True)}, tmp_path / "pickled.pt")
    torch.save({"not": "tensors"}, tmp_path / "foreign.pt")
    (tmp_path / "garbage.pt").write_bytes(pickle.dumps([1, 2, 3])[:5] + b"\x00" * 50)
    p = predict(tmp_path / "pickled.pt", "--eval")
    assert p.returncode == 2 and "refused" in one_error_line(p)
    for name, why in (("foreign.pt", "neither a launch checkpoint"), ("garbage.pt", "garbage.pt: (unreadable|refused)"), ("missing.pt", "no such file")):
        with pytest.raises(UserError, match=why) as e:
            load_source(str(tmp_path / name))
        assert "\n" not in str(e.value) and name in str(e.value)
    assert issubclass(CheckpointError, UserError)


def shadow(tmp_path, package: str) -> dict:
    """A PYTHONPATH on which `import package` fails, as if the optional extra were not installed."""
    (tmp_path / "shadow" / package).mkdir(parents=True)
    (tmp_path / "shadow" / package / "__init__.py").write_text("raise ImportError('not installed (test shadow)')\n")
    return {"PYTHONPATH": f"{tmp_path / 'shadow'}:{ROOT}"}


def test_missing_optional_extras_give_one_line_hints(tmp_path):
    run_dir = tmp_path / "r"
    (run_dir).mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "step": 1, "train_loss": 1, "eval_loss": 1, "eval_accuracy": 0.5}) + "\n")
    line = one_error_line(run([PY, "-m", "launch", "plot", str(run_dir)], **shadow(tmp_path, "matplotlib")))
    assert "pip install matplotlib" in line
    line = one_error_line(run([PY, "train_single.py", "--config", "configs/toy.yaml", "log.tensorboard=true", f"run.dir={tmp_path / 'tb'}"], **shadow(tmp_path, "tensorboard")))
    assert "pip install tensorboard" in line and not (tmp_path / "tb").exists()


def test_plot_helper_and_bad_run_dir(tmp_path):
    from launch.commands.plot import line_plot, plot_runs

    out = line_plot({"a": ([1, 2, 3], [3, 1, 2]), "b": ([1, 2, 3], [1, 2, 3], {"linestyle": "--"})}, tmp_path / "x" / "p.png", title="t", logy=True)
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(UserError, match="no metrics.jsonl"):
        plot_runs([str(tmp_path)], tmp_path / "q.png")


def test_subcommand_help(capsys):
    from launch.commands.cli import main

    for cmd, word in (("predict", "--eval"), ("plot", "RUN_DIR")):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0 and word in capsys.readouterr().out


@pytest.mark.parametrize("override, expect", [
    (["data.name=csv"], "data.path: required"),
    (["data.name=csv", "data.path=x.csv", "data.val_fraction=1.0"], "data.val_fraction"),
    (["data.name=npz", "data.path=x.npz", "data.val_fraction=0"], "leaves no evaluation set"),
    (["data.name=npz", "data.path=x.npz", "data.x_key="], "data.x_key"),
])
def test_new_data_options_are_validated(override, expect):
    with pytest.raises(UserError, match=expect):
        config_mod.load(None, override)
