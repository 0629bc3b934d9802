"""MLflow for a study: one parent run, one nested run per executed stage.

The store is a file store in ``STUDY_FOLDER/mlruns`` unless ``tracking.uri`` names another; the
parent run's id is kept in ``STUDY_FOLDER/tracking.json`` so that a re-run or ``--resume`` adds its
stages under the same parent. Browse it with the full ``mlflow`` package (the ``mlflow`` extra)::

    cd STUDY_FOLDER && MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri ./mlruns

With ``tracking.mlflow: false`` nothing is tracked and every call here is a no-op.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from tightfit._optional import require
from tightfit.training.loggers import flatten

TRACKING_FILE = "tracking.json"


class StudyTracker:
    """Parent and nested MLflow runs of a study (a no-op when tracking is off).

    Args:
        folder: the study folder.
        name: the study's name (the parent run's name and the default experiment).
        enabled: track or not.
        uri: a tracking URI; default ``file:FOLDER/mlruns``.
        experiment: the experiment; default the study's name.
    """

    def __init__(
        self, folder: Path, name: str, *, enabled: bool, uri: str | None = None, experiment: str | None = None
    ):
        self.enabled = enabled
        self.client = None
        self.parent_id: str | None = None
        if not enabled:
            return
        uri = uri or (Path(folder) / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow 3 keeps the file store behind this documented opt-out; it needs no server.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow = require("mlflow", extra="mlflow", purpose="tracking a study in MLflow (tracking.mlflow: true)")
        self.client = mlflow.tracking.MlflowClient(tracking_uri=uri)
        self.uri = uri
        found = self.client.get_experiment_by_name(experiment or name)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment or name)
        record = Path(folder) / TRACKING_FILE
        if record.is_file():
            saved = json.loads(record.read_text())
            if saved.get("uri") == uri and self._exists(saved.get("parent_run_id")):
                self.parent_id = saved["parent_run_id"]
        if self.parent_id is None:
            self.parent_id = self.client.create_run(self.experiment_id, run_name=name).info.run_id
            record.write_text(json.dumps({"uri": uri, "parent_run_id": self.parent_id}, indent=2))
        else:
            self.client.update_run(self.parent_id, status="RUNNING")

    def _exists(self, run_id: str | None) -> bool:
        if not run_id:
            return False
        try:
            self.client.get_run(run_id)
            return True
        except Exception:  # noqa: BLE001 - MLflow raises its own exception types for a missing run
            return False

    def start_stage(self, name: str, kind: str, settings: dict[str, Any]) -> str | None:
        """Open a nested run for a stage; returns its id (None when tracking is off)."""
        if not self.enabled:
            return None
        run = self.client.create_run(
            self.experiment_id, run_name=name, tags={"mlflow.parentRunId": self.parent_id, "tightfit.stage_kind": kind}
        )
        self.log_params(run.info.run_id, flatten(settings))
        return run.info.run_id

    def log_params(self, run_id: str | None, params: dict[str, Any]) -> None:
        if run_id is None:
            return
        from mlflow.entities import Param

        items = [Param(str(key), str(value)[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100])

    def log_metrics(self, run_id: str | None, metrics: dict[str, float], step: int = 0) -> None:
        if run_id is None:
            return
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [
            Metric(key.replace("@", "_"), float(value), stamp, step)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and value == value
        ]
        for start in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[start : start + 500])

    def log_artifact(self, run_id: str | None, path: Path) -> None:
        if run_id is None or not Path(path).exists():
            return
        if Path(path).is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path=Path(path).name)
        else:
            self.client.log_artifact(run_id, str(path))

    def end_stage(self, run_id: str | None, status: str = "FINISHED") -> None:
        if run_id is not None:
            self.client.set_terminated(run_id, status=status)

    def close(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self.client.set_terminated(self.parent_id, status=status)


class TrainerMetrics:
    """A trainer callback that copies validation and epoch metrics into a stage's nested run."""

    def __init__(self, tracker: StudyTracker, run_id: str | None):
        self.tracker = tracker
        self.run_id = run_id

    def on_epoch_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics(
            self.run_id, {key.replace("/", "_"): value for key, value in metrics.items()}, step=trainer.global_step
        )
