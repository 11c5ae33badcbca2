"""Issue 19, point 1: experiment trackers (log.tracker) that survive stops, crashes and requeues.

Real jobs, real tracker files: W&B offline (read back with wandb's own reader, `wandb leet inspect`)
and MLflow's sqlite store (read back through its client). A tracker's run is continued across
processes (its id in <run dir>/trackers.json), never duplicated, never given a step twice or a step
that goes backwards; a tracker that is missing stops the job before anything is written; one that
fails mid-run is one warning line and the run goes on.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import socket
import subprocess
import sys

import psutil
import pytest

from launch.errors import UserError
from launch.observe.logger import read_metrics
from tests.helpers import PY, ROOT, output, spawn

FAST = ["log.every_steps=4", "train.check_every_steps=1"]  # 12 steps per epoch at --nproc 2: a step record at each epoch's end too


def _have(*names) -> bool:
    try:
        for name in names:
            __import__(name)
    except ImportError:
        return False
    return True


needs_wandb = pytest.mark.skipif(not _have("wandb"), reason="wandb not installed (the [wandb] extra)")
needs_mlflow = pytest.mark.skipif(not _have("mlflow", "sqlalchemy", "alembic"), reason="mlflow-skinny, sqlalchemy, alembic not installed (the [mlflow] extra)")


def wandb_segments(*roots) -> list[list[dict]]:
    """The records of each process's W&B offline directory under <root>/wandb, oldest first (by the
    start time in its name), read by wandb's own reader."""
    readers = []
    for d in sorted((d for root in roots for d in (root / "wandb").glob("offline-run-*")), key=lambda d: d.name):
        (log,) = d.glob("run-*.wandb")
        readers.append(subprocess.Popen([PY, "-m", "wandb", "leet", "inspect", "--json", str(log)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    segments = []
    for p in readers:  # side by side: each is mostly the reader's start-up
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        segments.append([json.loads(line) for line in out.splitlines() if line.strip()])
    return segments


def mlflow_client(run_dir, copy: str = ""):
    """A client on <run dir>/mlflow.db, or on a copy of it named `copy`: MLflow keeps one database
    engine per store address in a process, which would go on reading a file replaced since."""
    from mlflow import MlflowClient

    db = run_dir.resolve() / "mlflow.db"
    if copy:
        db = shutil.copy(db, run_dir.parent / copy)
    return MlflowClient(tracking_uri=f"sqlite:///{db}")


def assert_mlflow_has_metrics_jsonl(client, run_id: str, records: list[dict]) -> None:
    """Every field's points in the MLflow run, step by step, are those of metrics.jsonl."""
    want = per_key(records)
    assert set(client.get_run(run_id).data.metrics) == set(want)
    for key, points in want.items():
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == points, key


def per_key(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as each tracker should have it: per field, (step, value) once per step."""
    out: dict[str, list] = {}
    for rec in records:
        for key, value in rec.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                seen = out.setdefault(key, [])
                if not seen or seen[-1][0] != rec["step"]:
                    seen.append((rec["step"], float(value)))
    return out


def relays_of(run_dir) -> list:
    return [p for p in psutil.process_iter(["cmdline"]) if "launch.observe.trackers.relay" in (p.info["cmdline"] or []) and str(run_dir) in p.info["cmdline"]]


# --------------------------------------------------------------------------- stop, crash, rerun


@needs_wandb
@needs_mlflow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the MLflow client's own, on sqlalchemy 2.1
def test_stop_crash_and_rerun_continue_one_tracker_run_each(tmp_path):
    """A stop, a crash and a rerun: one W&B run and one MLflow run through all three, nothing twice or
    backwards, equal to metrics.jsonl. The crashed job changed a setting on its resume (MLflow keeps it as
    a parameter of its own); the last rerun finds mlflow.db lost (a new MLflow run, caught up from
    metrics.jsonl) and WANDB_DIR set (W&B's files go there; before, into the run directory)."""
    run_dir, elsewhere = tmp_path / "r", tmp_path / "wandb_dir"
    args = [*FAST, "log.tracker=[wandb,mlflow]"]
    env = {"WANDB_MODE": "offline"}
    p = spawn(2, run_dir, *args, LAUNCH_FAULT="stop:step=14", **env)  # a stop mid-epoch 1 (exit 75), as a requeue's SIGTERM
    assert p.returncode == 75, output(p)
    ids = json.loads((run_dir / "trackers.json").read_text())
    args.append("train.check_every_steps=2")  # a setting changed on the resume at 14
    p = spawn(2, run_dir, *args, LAUNCH_FAULT="raise:step=22:rank=0", **env)  # logs 16 and 20, then crashes: the rerun redoes them from 14
    assert p.returncode == 1 and "changed on resume at step 14: train.check_every_steps 1 -> 2" in p.stdout, output(p)
    psutil.wait_procs(relays_of(run_dir), timeout=120)  # a failed job does not wait for its relay's finish
    client = mlflow_client(run_dir, copy="crashed.db")
    mrun = client.get_run(ids["mlflow"]["id"])  # the same run, continued, with the change beside the original value
    changed = {k: v for k, v in mrun.data.params.items() if k.startswith("train.check_every_steps")}
    assert changed == {"train.check_every_steps": "1", "train.check_every_steps/step14": "2"}, changed
    assert mrun.info.status == "FAILED"
    assert_mlflow_has_metrics_jsonl(client, mrun.info.run_id, read_metrics(run_dir))  # 4 to 20, each once

    (run_dir / "mlflow.db").unlink()
    p = spawn(2, run_dir, *args, WANDB_DIR=elsewhere, **env)
    assert p.returncode == 0, output(p)
    assert f"offline, in {elsewhere / 'wandb'}; wandb sync" in p.stdout, output(p)
    assert "a new run, caught up from metrics.jsonl: run {} of trackers.json is not in this store".format(ids["mlflow"]["id"]) in p.stdout, output(p)
    assert not relays_of(run_dir), "the job ended before its relay finished"
    state = json.loads((run_dir / "trackers.json").read_text())
    assert state["wandb"]["id"] == ids["wandb"]["id"] and state["mlflow"]["id"] != ids["mlflow"]["id"]
    assert state["wandb"]["status"] == state["mlflow"]["status"] == "finished"
    records = read_metrics(run_dir)
    steps = [r["step"] for r in records]
    assert steps == [4, 8, 12, 12, 16, 20, 24, 24], steps  # step and epoch records, 16 and 20 computed twice, written once
    want = per_key(records)

    # W&B: one run (every process's directory has the same id), one row per record, in order.
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2 and len(list((elsewhere / "wandb").glob("offline-run-*"))) == 1
    segments = wandb_segments(run_dir, elsewhere)
    assert len(segments) == 3 and {s[1]["run"]["run_id"] for s in segments} == {state["wandb"]["id"]}
    rows = [r["history"]["item"] for s in segments for r in s if r["type"] == "history"]
    assert [r["step"] for r in rows] == steps
    assert [r["_step"] for r in rows] == list(range(len(rows)))  # W&B's own row counter never repeats
    got: dict[str, list] = {}
    for row in rows:
        for key, value in row.items():
            if not key.startswith("_") and key != "step":
                got.setdefault(key, []).append((row["step"], float(value)))
    assert got == want
    exits = [[r["exit"]["exit_code"] for r in s if r["type"] == "exit"] for s in segments]
    assert exits == [[1], [1], [0]], exits  # stopped, crashed (closed by the relay all the same), finished
    last = segments[-1]
    assert any(r["type"] == "summary" and r["summary"]["update"].get("model_path") == str((run_dir / "model.pt").resolve()) for r in last)
    config = [r for s in segments for r in s if r["type"] == "config"]
    assert config and "train" in json.dumps(config[0])

    # MLflow: the new run, FINISHED, every field's history equal to metrics.jsonl (the first steps caught up).
    client = mlflow_client(run_dir, copy="finished.db")
    (experiment,) = [e for e in client.search_experiments() if e.name == "launch"]
    (mrun,) = client.search_runs([experiment.experiment_id])
    assert mrun.info.run_id == state["mlflow"]["id"] and mrun.info.status == "FINISHED"
    assert mrun.data.tags["model_path"] == str((run_dir / "model.pt").resolve())
    assert mrun.data.params["train.epochs"] == "2" and mrun.data.params["log.tracker"] == '["wandb", "mlflow"]'
    assert mrun.data.params["train.check_every_steps"] == "2"
    assert_mlflow_has_metrics_jsonl(client, mrun.info.run_id, records)


# --------------------------------------------------------------------------- missing, failing


HIDE_WANDB = """import sys
class _Hide:  # as if wandb were not installed: no import system finds it
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "wandb":
            raise ModuleNotFoundError(f"No module named '{name}'")
sys.meta_path.insert(0, _Hide())
"""


def test_a_missing_tracker_is_one_line_before_anything_is_written(tmp_path):
    (tmp_path / "hide").mkdir()
    (tmp_path / "hide" / "sitecustomize.py").write_text(HIDE_WANDB)  # in every process of the job, the spawned ranks too
    run_dir = tmp_path / "r"
    p = spawn(2, run_dir, "log.tracker=[wandb]", PYTHONPATH=f"{tmp_path / 'hide'}:{ROOT}")
    assert p.returncode == 2, output(p)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: log.tracker: wandb") and "pip install wandb" in lines[0], output(p)
    assert not run_dir.exists()


def test_mlflow_asks_for_its_sqlite_store_and_unknown_names_are_refused(monkeypatch):
    from launch import config
    from launch.observe import trackers

    if not _have("mlflow"):
        pytest.skip("mlflow not installed (the [mlflow] extra)")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # import sqlalchemy now fails, as without the package
    with pytest.raises(UserError, match=r"log.tracker: mlflow .*sqlalchemy.*\[mlflow\] extra"):
        trackers.check(["mlflow"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    trackers.check(["mlflow"])  # a tracking server needs no database packages here
    with pytest.raises(UserError, match="unknown tracker 'wandbb'"):
        config.load(None, ["log.tracker=[wandbb]"])
    assert config.load(None, ["log.tensorboard=true", "log.tracker=[wandb,tensorboard]"]).log.trackers == ["wandb", "tensorboard"]


GARBAGE = b"this is not an sqlite database\n" * 64


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_here(run_dir, *overrides) -> int:
    """One process's job in this process (no process boundary is under test here; its tracker relay is
    a process of its own all the same): the exit code the plain launcher would give, after the relay
    has finished (it writes to the same stdout and stderr, which capfd reads)."""
    from launch import config
    from launch.processes.dist import DistEnv, setup
    from launch.processes.stopping import Stopped
    from launch.train.loop import train
    from tests import jobs
    from tests.helpers import SMALL

    cfg = config.load(None, [*SMALL, f"run.dir={run_dir}", *overrides])
    try:
        with jobs.one_thread():
            train(cfg, setup(cfg, DistEnv("plain")))
        code = 0
    except Stopped as e:
        code = e.code
    psutil.wait_procs(relays_of(run_dir), timeout=120)
    return code


@needs_mlflow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_failing_tracker_warns_once_and_a_rerun_catches_it_up(tmp_path, monkeypatch, capfd):
    """...from metrics.jsonl, even when MLflow's sqlite file there is garbage: set aside, one line, a fresh one."""
    run_dir = tmp_path / "r"
    args = [*FAST, "data.batch_size=32", "log.tracker=[mlflow,tests.user_trackers:Recorder]"]
    # MLflow's server is gone (nothing listens there) and the recorder's disk is full from step 10.
    gone = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{_closed_port()}", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "RECORDER_FAIL_AT": "10"}
    for key, value in {**gone, "LAUNCH_FAULT": "stop:step=20"}.items():
        monkeypatch.setenv(key, value)
    code = train_here(run_dir, *args)
    out, err = capfd.readouterr()
    assert code == 75, out + err
    warnings = [line for line in err.splitlines() if line.startswith("warning: tracker")]
    assert len(warnings) == 2, out + err
    assert "tracker mlflow failed while opening its run" in warnings[0] + warnings[1]
    assert any("tracker tests.user_trackers:Recorder failed at step 12 (OSError: [Errno 28] No space left" in w for w in warnings), warnings
    assert [r["step"] for r in read_metrics(run_dir)] == [4, 8, 12, 12, 16]  # metrics.jsonl unaffected (a stop at 20 comes before its record)
    # The rerun, with both working again (MLflow on the default sqlite file, where garbage lies): each
    # catches up from metrics.jsonl and goes on, nothing twice; the garbage is set aside, said in one line.
    for key in (*gone, "LAUNCH_FAULT"):
        monkeypatch.delenv(key)
    db = run_dir / "mlflow.db"
    db.write_bytes(GARBAGE)
    code = train_here(run_dir, *args)
    out, err = capfd.readouterr()
    assert code == 0 and "warning" not in err, out + err
    steps = [r["step"] for r in read_metrics(run_dir)]
    recorded = [json.loads(line) for line in (run_dir / "recorder.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recorded if "step" in r] == steps
    assert [r["finish"] for r in recorded if "finish" in r] == ["finished"]  # the failed one got no more calls
    said = [line for line in out.splitlines() if line.startswith("mlflow: ")]
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]["id"]
    assert len(said) == 1 and f"run {run_id} in sqlite:///{db} (a new run, caught up from metrics.jsonl: {db} was unreadable (file is not a database), kept as mlflow.db.unreadable-" in said[0], out + err
    (kept,) = run_dir.glob("mlflow.db.unreadable-*")
    assert kept.read_bytes() == GARBAGE  # set aside as it was, never deleted
    client = mlflow_client(run_dir)
    (mrun,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert mrun.info.run_id == run_id and mrun.info.status == "FINISHED"
    assert_mlflow_has_metrics_jsonl(client, run_id, read_metrics(run_dir))


# --------------------------------------------------------------------------- the relay in process


def test_the_relay_logs_each_step_once_and_never_backwards(tmp_path, monkeypatch):
    """The rules on their own: a step's second record adds only what it lacks; after a restart,
    records at or before the last logged step are skipped (a recomputed record), new ones go on; a
    resume's catch-up reads metrics.jsonl up to its step, and a tracker whose run had to start anew
    (another id from open) gets all of it."""
    from launch.observe.trackers import relay

    meta = {"name": "t", "project": "", "config": {"train": {"lr": 0.1}}}
    opening = json.dumps({"open": {"names": ["tests.user_trackers:Recorder"], "meta": meta}})

    def feed(*records, end=None, catch_up=None):
        lines = [opening] + ([json.dumps({"catch_up": catch_up})] if catch_up is not None else [])
        lines += [*(json.dumps({"record": r}) for r in records)] + ([json.dumps({"end": end})] if end else [])
        out, err = io.StringIO(), io.StringIO()
        relay.serve(tmp_path, iter(lines), out, err)
        assert err.getvalue() == ""
        return out.getvalue()

    feed({"step": 4, "lr": 0.1, "train_loss_step": 1.0}, {"step": 4, "lr": 0.1, "train_loss": 0.9, "cuda_peak_mb": [10, 20]}, {"step": 8, "lr": 0.1})
    said = feed({"step": 4, "lr": 0.1}, {"step": 8, "lr": 0.1, "eval_loss": 2.0}, {"step": 12, "lr": 0.2, "ok": True}, end="/x/model.pt")
    assert "continuing after step 8" in said
    got = [json.loads(line) for line in (tmp_path / "recorder.jsonl").read_text().splitlines()]
    assert got == [
        {"open": None, "lr": 0.1},
        {"step": 4, "numbers": {"lr": 0.1, "train_loss_step": 1.0}},
        {"step": 4, "numbers": {"train_loss": 0.9, "cuda_peak_mb/rank0": 10, "cuda_peak_mb/rank1": 20}},
        {"step": 8, "numbers": {"lr": 0.1}},
        {"finish": "failed", "model": None},  # the pipe ended without an end
        {"open": "rec-1", "lr": 0.1},
        {"step": 8, "numbers": {"eval_loss": 2.0}},
        {"step": 12, "numbers": {"lr": 0.2}},
        {"finish": "finished", "model": "/x/model.pt"},
    ]
    state = json.loads((tmp_path / "trackers.json").read_text())["tests.user_trackers:Recorder"]
    assert state["step"] == 12 and state["status"] == "finished"

    # Its store lost the run: open names another, which gets metrics.jsonl's records up to the
    # resumed step (not the one after it, nor the torn line), then the new ones.
    kept = [{"step": 4, "lr": 0.1}, {"step": 8, "lr": 0.1}, {"step": 12, "lr": 0.2}, {"step": 16, "lr": 0.3}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"step": 1')
    monkeypatch.setenv("RECORDER_ID", "rec-2")
    said = feed({"step": 16, "lr": 0.4}, catch_up=12)
    assert "continuing" not in said
    got = [json.loads(line) for line in (tmp_path / "recorder.jsonl").read_text().splitlines()][9:]
    assert got == [{"open": "rec-1", "lr": 0.1}, *({"step": r["step"], "numbers": {"lr": r["lr"]}} for r in kept[:3]),
                   {"step": 16, "numbers": {"lr": 0.4}}, {"finish": "failed", "model": None}]
    state = json.loads((tmp_path / "trackers.json").read_text())["tests.user_trackers:Recorder"]
    assert state["id"] == "rec-2" and state["step"] == 16


def test_mlflow_names_each_change_of_a_setting_with_its_step_and_never_reuses_a_name():
    """A NaN at step 100 (exit 3), `train.lr` lowered, NaN again, lowered again (both reruns resume at
    100), then back to the first value at 300: each change is a name of its own, in MLflow's alphabet
    (no '@'), saying the setting and the step; an unchanged setting adds nothing."""
    from launch.observe.trackers.mlflow_tracker import changed_params

    have = {"train.lr": "0.1", "train.epochs": "9"}
    for lr, step, new in (("0.05", 100, "train.lr/step100"), ("0.02", 100, "train.lr/step100-2"), ("0.02", 200, None),
                          ("0.1", 300, "train.lr/step300"), ("0.1", 400, None)):
        got = changed_params(have, {"train.lr": lr, "train.epochs": "9", "log.new": "1"}, step)
        assert got == {**({new: lr} if new else {}), **({} if "log.new" in have else {"log.new": "1"})}, (lr, step, got)
        assert all(re.fullmatch(r"[\w./ :-]+", k) for k in got)
        have.update(got)


def test_a_fresh_start_moves_the_tracker_runs_aside_with_the_rest(tmp_path):
    """ckpt.resume=never: trackers.json, wandb/ and mlflow.db go with the previous run, so the new
    run opens new tracker runs instead of continuing (and skipping the steps of) the old ones."""
    from launch.checkpoint import rundir

    for name in ("trackers.json", "trackers.log", "mlflow.db", "metrics.jsonl"):
        (tmp_path / name).write_text("x")
    (tmp_path / "wandb").mkdir()
    (tmp_path / ".trackers.lock").write_text("")
    moved = rundir.move_previous_run(tmp_path)
    assert sorted(p.name for p in moved.iterdir()) == ["metrics.jsonl", "mlflow.db", "trackers.json", "trackers.log", "wandb"]
    assert (tmp_path / ".trackers.lock").exists()  # the relays' turn-taking stays with the directory
