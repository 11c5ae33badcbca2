"""MLflow, through its client (no global active run). The store is MLFLOW_TRACKING_URI when set, else
a sqlite file in the run directory (`sqlite:///<run dir>/mlflow.db`: MLflow 3 refuses its old file
store; the sqlite store needs sqlalchemy and alembic beside mlflow-skinny). `mlflow ui
--backend-store-uri sqlite:///<run dir>/mlflow.db` shows it.

Parameters are the resolved config, `section.key` by `section.key`. MLflow never lets a parameter
change, so a setting changed on a resume is logged as `section.key@step<N>` next to the original."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

from launch.observe.trackers import require

BATCH = 100  # parameters per call (MLflow takes up to 100 per log_batch)
MAX_PARAM = 6000  # MLflow's limit on a parameter's value


def store_uri(run_dir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


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
        self.client = MlflowClient(tracking_uri=uri)
        if saved.get("id"):
            self.run_id = saved["id"]
            self.client.update_run(self.run_id, status="RUNNING")  # raises if this store does not hold it
        else:
            name = self.meta["project"] or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "launch"
            found = self.client.get_experiment_by_name(name)
            # With the default store, keep any artifacts in the run directory too (MLflow's default is ./mlruns).
            where = None if "MLFLOW_TRACKING_URI" in os.environ else (self.run_dir.resolve() / "mlartifacts").as_uri()
            experiment = found.experiment_id if found else self.client.create_experiment(name, artifact_location=where)
            self.run_id = self.client.create_run(experiment, run_name=self.meta["name"]).info.run_id
        self._params(saved.get("step"))
        self.where = f"run {self.run_id} in {uri}"
        return {"id": self.run_id}

    def _params(self, step: Optional[int]) -> None:
        from mlflow.entities import Param

        have = self.client.get_run(self.run_id).data.params
        new = []
        for key, value in _flat(self.meta["config"]).items():
            if key in have and have[key] != value:
                key = f"{key}@step{step or 0}"
            if have.get(key) != value:
                new.append(Param(key, value))
        for i in range(0, len(new), BATCH):
            self.client.log_batch(self.run_id, params=new[i:i + BATCH])

    def log(self, step: int, numbers: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in numbers.items()])

    def finish(self, status: str, model: Optional[str]) -> None:
        if model:
            self.client.set_tag(self.run_id, "model_path", model)
        self.client.set_terminated(self.run_id, {"finished": "FINISHED", "stopped": "KILLED"}.get(status, "FAILED"))


def _flat(config: dict) -> dict:
    """{'train.lr': '0.1', ...}: MLflow parameters are text, at most MAX_PARAM characters."""
    out = {}
    for section, body in config.items():
        for key, value in (body.items() if isinstance(body, dict) else [("", body)]):
            text = value if isinstance(value, str) else json.dumps(value)
            out[f"{section}.{key}" if key else section] = text[:MAX_PARAM]
    return out
