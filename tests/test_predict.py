"""Issue 22 points 11 and 13: `launch predict -o` for datasets without num_classes (ImageFolder and
Hugging Face datasets have none), for every kind of output (classes, one logit, several labels, values,
an own loss's outputs), and user code named `pkg.module:Class.method`. In-process: a run of a few steps
with `launch.train.loop.train`, then `launch.commands.predict.run`."""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import re

import numpy as np
import pytest
import torch

from launch import config
from launch.commands import predict
from launch.errors import UserError
from launch.models.build import build_model
from launch.observe.logger import read_metrics
from launch.processes.dist import DistEnv, setup
from launch.train.loop import train

M = "tests.user_code_methods"


def train_run(run_dir, *overrides) -> dict:
    cfg = config.load(None, ["train.epochs=1", "data.batch_size=16", "log.progress=false", "train.device=cpu", f"run.dir={run_dir}", *overrides])
    with contextlib.redirect_stdout(io.StringIO()):
        return train(cfg, setup(cfg, DistEnv("plain")))


def predict_run(*argv) -> str:
    parser = argparse.ArgumentParser()
    predict.add_arguments(parser)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert predict.run(parser.parse_args([str(a) for a in argv])) == 0
    return out.getvalue()


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("dataset, names", [
    ("Folder", ["cat", "dog", "eel"]),  # torchvision's ImageFolder: `classes`
    ("HFLike", ["north", "south", "west"]),  # a Hugging Face ClassLabel feature, dict items
    ("Bare", ["0", "1", "2"]),  # nothing: the class indices
])
def test_predict_writes_classes_for_a_dataset_without_num_classes(tmp_path, dataset, names):
    run_dir = tmp_path / "run"
    train_run(run_dir, f"model.name={M}:Net", f"data.name={M}:{dataset}")
    out = tmp_path / "p.csv"
    said = predict_run(run_dir, "-o", out, "--split", "train")
    assert f"wrote 60 predictions (train split of data.name={M}:{dataset})" in said
    rows = read_csv(out)
    assert list(rows[0]) == ["row", "prediction", *[f"prob_{n}" for n in names], "label"] and len(rows) == 60
    # the run's own data: the label column holds the dataset's targets by name, in sample order
    from tests.user_code_methods import blobs

    _, y = blobs("train", 60)
    assert [r["label"] for r in rows] == [names[k] for k in y.tolist()]
    for r in rows:
        probs = [float(r[f"prob_{n}"]) for n in names]
        assert abs(sum(probs) - 1) < 1e-4 and r["prediction"] == names[int(np.argmax(probs))]
    # --eval -o: the JSON line and the same file; the accuracy the file shows is the one --eval prints
    result = json.loads(predict_run(run_dir, "--eval", "-o", tmp_path / "q.csv", "--split", "train").splitlines()[0])
    rows = read_csv(tmp_path / "q.csv")
    assert result["accuracy"] == pytest.approx(np.mean([r["prediction"] == r["label"] for r in rows]))


def test_predict_one_logit_several_labels_and_an_own_loss(tmp_path):
    # one logit (bce_with_logits on a two-class csv): the two class names and their probabilities
    rows = "".join(f"{i % 7},{(i * 3) % 5},{'yes' if (i % 7) > 3 else 'no'}\n" for i in range(80))
    (tmp_path / "b.csv").write_text("a,b,answer\n" + rows)
    train_run(tmp_path / "bin", "data.name=csv", f"data.path={tmp_path / 'b.csv'}", "data.target=answer", "train.loss=bce_with_logits")
    predict_run(tmp_path / "bin", "-o", tmp_path / "bin.csv")
    got = read_csv(tmp_path / "bin.csv")
    assert list(got[0]) == ["row", "prediction", "prob_no", "prob_yes", "label"]
    assert all(r["prediction"] == ("yes" if float(r["prob_yes"]) > 0.5 else "no") and r["label"] in ("no", "yes") for r in got)
    # rows to predict may lack their label (an empty cell, nan): predictions pass it through; --eval refuses it
    (tmp_path / "new.csv").write_text("answer,b,a\n,1,6\nnan,2,0\nyes,0,5\n")
    predict_run(tmp_path / "bin", "--input", tmp_path / "new.csv", "-o", tmp_path / "new_p.csv")
    assert [(r["prediction"], r["label"]) for r in read_csv(tmp_path / "new_p.csv")] == [("yes", ""), ("no", "nan"), ("yes", "yes")]
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'new.csv'} line 2, column 'answer': empty label")):
        predict_run(tmp_path / "bin", "--input", tmp_path / "new.csv", "--eval")
    # several labels per sample: the labels over 0.5, joined by '|'
    train_run(tmp_path / "ml", f"model.name={M}:Net", "model.kwargs={outputs: 2}", f"data.name={M}:MultiLabel", "train.loss=bce_with_logits")
    predict_run(tmp_path / "ml", "-o", tmp_path / "ml.csv")
    got = read_csv(tmp_path / "ml.csv")
    assert list(got[0]) == ["row", "prediction", "prob_big", "prob_odd", "label"]
    for r in got:
        assert r["prediction"] == "|".join(n for n in ("big", "odd") if float(r[f"prob_{n}"]) > 0.5)
    assert {r["label"] for r in got} <= {"", "big", "odd", "big|odd"}
    # an own loss function: the outputs as they are
    train_run(tmp_path / "own", f"model.name={M}:Net", f"data.name={M}:Bare", f"train.loss={M}:Factory.loss")
    predict_run(tmp_path / "own", "-o", tmp_path / "own.csv")
    got = read_csv(tmp_path / "own.csv")
    assert list(got[0]) == ["row", "output_0", "output_1", "output_2", "label"] and got[0]["label"] in ("0", "1", "2")


def test_class_methods_name_the_model_data_loss_and_metric(tmp_path):
    result = train_run(tmp_path / "run", f"model.name={M}:Factory.model", "model.kwargs={outputs: 3}", f"data.name={M}:Factory.data",
                       f"train.loss={M}:Factory.loss", f"train.metrics=[accuracy, {M}:Factory.hits]")
    last = read_metrics(tmp_path / "run")[-1]
    assert last["eval_hits"] == pytest.approx(last["eval_accuracy"]) and result["eval_accuracy"] == last["eval_accuracy"]
    with pytest.raises(UserError, match=r"'tests.user_code_methods:Factory' has no 'nope'"):
        train_run(tmp_path / "other", f"model.name={M}:Factory.nope")
    assert not (tmp_path / "other").exists()


def test_a_hugging_face_model_from_a_class_method_factory():
    pytest.importorskip("transformers")
    cfg = config.load(None, ["model.name=transformers:AutoModelForCausalLM.from_config",
                             "model.kwargs.config={_target_: transformers:LlamaConfig, vocab_size: 13, hidden_size: 16, intermediate_size: 32, "
                             "num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 16}"])
    model = build_model(cfg, 0, None)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.hidden_size == 16
    logits = model(torch.zeros(2, 5, dtype=torch.long)).logits
    assert logits.shape == (2, 5, 13)
