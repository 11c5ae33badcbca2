"""MLflow, through its client (no global active run). The store is MLFLOW_TRACKING_URI when set, else
a sqlite file in the run directory (`sqlite:///<run dir>/mlflow.db`: MLflow 3 refuses its old file
store; the sqlite store needs sqlalchemy and alembic beside mlflow-skinny). `mlflow ui
--backend-store-uri sqlite:///<run dir>/mlflow.db` shows it.

Parameters are the resolved config, `section.key` by `section.key`. MLflow never lets a parameter
change, so a setting changed on a resume at step N is logged beside the original as
`section.key/stepN` (MLflow's keys allow letters, digits, `_ - . / :` and spaces; `/` works on every
platform and store), and changed again at the same step as `section.key/stepN-2`, `-3`, ...

A run this store no longer holds (the sqlite file lost, or the run deleted) is not continued: a new
run is opened and the relay catches it up from metrics.jsonl. A damaged default sqlite file (not a
database, or torn) is set aside as `mlflow.db.unreadable-<time>` first, never deleted. Either is said
in the tracker's one opening line."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from pathlib import Path
from typing import Optional

from launch.checkpoint import integrity
from launch.observe.trackers import require

BATCH = 100  # parameters per call (MLflow takes up to 100 per log_batch)
MAX_PARAM = 6000  # MLflow's limit on a parameter's value
DB = "mlflow.db"


def store_uri(run_dir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(run_dir).resolve() / DB}"


class MlflowTracker:
    @classmethod
    def check(cls) -> None:
        """A database store (the default sqlite file) needs sqlalchemy and alembic, which mlflow-skinny leaves out."""
        require("mlflow")
        if store_uri(Path(".")).split(":", 1)[0] not in ("http", "https", "databricks"):
            require("sqlalchemy", "alembic")

    def __init__(self, run_dir: Path, meta: dict):
        self.run_dir, self.meta = Path(run_dir), meta
        self.client = None
        self.run_id = ""
        self.where = ""

    def open(self, saved: dict) -> dict:
        from mlflow import MlflowClient  # here, in the relay: the training processes only check that it is installed

        uri = store_uri(self.run_dir)
        why_new = [] if "MLFLOW_TRACKING_URI" in os.environ else _set_aside_if_damaged(self.run_dir / DB)
        self.client = MlflowClient(tracking_uri=uri)
        if saved.get("id") and self._holds(saved["id"]):
            self.run_id = saved["id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            if saved.get("id") and not why_new:
                why_new.append(f"run {saved['id']} of trackers.json is not in this store")
            name = self.meta["project"] or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "launch"
            found = self.client.get_experiment_by_name(name)
            # With the default store, keep any artifacts in the run directory too (MLflow's default is ./mlruns).
            where = None if "MLFLOW_TRACKING_URI" in os.environ else (self.run_dir.resolve() / "mlartifacts").as_uri()
            experiment = found.experiment_id if found else self.client.create_experiment(name, artifact_location=where)
            self.run_id = self.client.create_run(experiment, run_name=self.meta["name"]).info.run_id
        self._params(int(self.meta.get("step") or 0))
        self.where = f"run {self.run_id} in {uri}"
        if why_new:
            self.where += f" (a new run, caught up from metrics.jsonl: {'; '.join(why_new)})"
        return {"id": self.run_id}

    def _holds(self, run_id: str) -> bool:
        """Whether the store still has this run, alive; False only when it says so (an unreachable store raises)."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).info.lifecycle_stage != "deleted"
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise

    def _params(self, step: int) -> None:
        from mlflow.entities import Param

        new = changed_params(self.client.get_run(self.run_id).data.params, _flat(self.meta["config"]), step)
        params = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(params), BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + BATCH])

    def log(self, step: int, numbers: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in numbers.items()])

    def finish(self, status: str, model: Optional[str]) -> None:
        if model:
            self.client.set_tag(self.run_id, "model_path", model)
        self.client.set_terminated(self.run_id, {"finished": "FINISHED", "stopped": "KILLED"}.get(status, "FAILED"))


def changed_params(have: dict, config: dict, step: int) -> dict:
    """The parameters to log: a setting the run lacks under its own name; one whose value differs from
    the one in force (its latest `key/stepN[-k]`, else `key`) as `key/step<step>`, or `-2`, `-3`, ...
    when that name is taken (a second change at the same step: another rerun from the same checkpoint)."""
    new = {}
    for key, value in config.items():
        if key not in have:
            new[key] = value
            continue
        changes = sorted((when, name) for name in have if (when := _when(key, name)))
        current = have[changes[-1][1]] if changes else have[key]
        if current == value:
            continue
        name, n = f"{key}/step{step}", 1
        while name in have:
            n += 1
            name = f"{key}/step{step}-{n}"
        new[name] = value
    return new


def _when(key: str, name: str) -> Optional[tuple[int, int]]:
    """(step, n) of a change's name `key/stepN` or `key/stepN-n`; None for any other name."""
    m = re.fullmatch(re.escape(key) + r"/step(\d+)(?:-(\d+))?", name)
    return (int(m.group(1)), int(m.group(2) or 1)) if m else None


def _set_aside_if_damaged(db: Path) -> list[str]:
    """The default store's file, checked by sqlite itself (`PRAGMA quick_check`: milliseconds for a run's
    metrics): one that is not a database or is corrupt is renamed aside, and MLflow starts a fresh file.
    Opened for writing, as MLflow would: sqlite then rolls back a transaction a killed relay left in its
    journal (read-only, that file would look unreadable). Locked, busy or unreadable is not damage: left."""
    if not db.is_file() or db.stat().st_size == 0:
        return []
    try:
        con = sqlite3.connect(db)
        try:
            result = con.execute("PRAGMA quick_check").fetchone()
        finally:
            con.close()
        problem = None if result and result[0] == "ok" else str(result[0] if result else "no answer")
    except sqlite3.DatabaseError as e:
        damaged = getattr(e, "sqlite_errorname", "").startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT"))
        problem = str(e) if damaged else None
    if problem is None:
        return []
    kept = integrity.set_aside(db, "unreadable")
    return [f"{db} was unreadable ({problem}), kept as {kept.name if kept else '?'}"]


def _flat(config: dict) -> dict:
    """{'train.lr': '0.1', ...}: MLflow parameters are text, at most MAX_PARAM characters."""
    out = {}
    for section, body in config.items():
        for key, value in (body.items() if isinstance(body, dict) else [("", body)]):
            text = value if isinstance(value, str) else json.dumps(value)
            out[f"{section}.{key}" if key else section] = text[:MAX_PARAM]
    return out
