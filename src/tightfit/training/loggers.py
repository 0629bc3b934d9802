"""Where metrics go: the console, JSON lines, TensorBoard, MLflow and W&B, behind one small protocol.

Every logger receives the same calls; the trainer builds the ones the ``logging:`` section asks
for, on rank 0 only. ``stage`` says which part of the run the numbers come from: ``train``
(every ``logging.every_n_steps`` optimizer steps), ``val``, ``test`` or ``epoch``.
"""

import json
import os
import time
from pathlib import Path
from typing import Any, Protocol

from tightfit._optional import require


class Logger(Protocol):
    """The interface every logger implements."""

    def log_params(self, params: dict[str, Any]) -> None:
        """Record the run's configuration (flattened, dotted keys)."""

    def log_metrics(self, metrics: dict[str, float], *, step: int, stage: str) -> None:
        """Record numbers at an optimizer step."""

    def log_artifact(self, path: Path) -> None:
        """Keep a file or folder with the run (the best checkpoint)."""

    def close(self) -> None:
        """Flush and release files."""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optimizer": {"lr": 0.1}}`` -> ``{"optimizer.lr": 0.1}``."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def metric_tag(key: str, stage: str, separator: str) -> str:
    """``val_loss`` -> ``val/loss``; ``lr`` at stage train -> ``train/lr``; ``memory/rss_bytes`` kept."""
    if "/" in key:
        return key
    if key.startswith(stage + "_"):
        return stage + separator + key[len(stage) + 1 :]
    return stage + separator + key


class ConsoleLogger:
    """One line per validation, epoch and test result (the progress bar shows the steps)."""

    def __init__(self, console: Any):
        self.console = console

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], *, step: int, stage: str) -> None:
        if stage == "train":
            return
        shown = "  ".join(
            f"{key} {_format_number(value)}" for key, value in metrics.items() if not key.startswith("memory/")
        )
        self.console.print(f"[bold]{stage:>5}[/] step {step:>6}  {shown}")

    def log_artifact(self, path: Path) -> None:
        pass

    def close(self) -> None:
        pass


def _format_number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1:
        return f"{int(value)}"
    return f"{value:.4g}"


class JsonlLogger:
    """``metrics.jsonl``: one JSON object per line, ``{"stage", "step", "time", ...metrics}``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = self.path.open("a", buffering=1)  # line-buffered: a killed run keeps every line

    def log_params(self, params: dict[str, Any]) -> None:
        pass  # the resolved config is saved as config.yaml next to this file

    def log_metrics(self, metrics: dict[str, float], *, step: int, stage: str) -> None:
        self.file.write(json.dumps({"stage": stage, "step": step, "time": round(time.time(), 3), **metrics}) + "\n")

    def log_artifact(self, path: Path) -> None:
        pass

    def close(self) -> None:
        self.file.close()


class TensorBoardLogger:
    """TensorBoard event files under ``RUN_DIR/tensorboard`` (scalars named ``stage/metric``)."""

    def __init__(self, directory: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(directory))

    def log_params(self, params: dict[str, Any]) -> None:
        text = "\n".join(f"    {key}: {value}" for key, value in params.items())
        self.writer.add_text("config", text, global_step=0)

    def log_metrics(self, metrics: dict[str, float], *, step: int, stage: str) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(metric_tag(key, stage, "/"), value, global_step=step)

    def log_artifact(self, path: Path) -> None:
        pass

    def close(self) -> None:
        self.writer.close()


class MLflowLogger:
    """MLflow tracking without a server: a local file store (``file:RUN_DIR/mlruns`` by default).

    Args:
        tracking_uri: where MLflow writes (a ``file:`` or ``sqlite:`` URI).
        experiment: the experiment's name.
        run_name: the MLflow run's name (the run directory's name).
    """

    def __init__(self, tracking_uri: str, experiment: str, run_name: str):
        if tracking_uri.startswith("file:"):
            # MLflow 3 keeps the file store only behind this documented opt-out; it is the one
            # store that needs neither a server nor SQLAlchemy, which mlflow-skinny leaves out.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow = require("mlflow", extra="mlflow", purpose="logging to MLflow")
        self.client = mlflow.tracking.MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # MLflow caps a parameter value at 6000 characters and a batch at 100 parameters.
        items = [Param(key, str(value)[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], *, step: int, stage: str) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        items = [Metric(metric_tag(key, stage, "_"), float(value), timestamp, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: Path) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
        else:
            self.client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbLogger:
    """Weights & Biases, offline by default: the run is written under ``RUN_DIR/wandb`` and sent
    only by ``wandb sync`` (or logged live with ``logging.wandb_mode: online``). Metric names as
    Lightning's ``WandbLogger`` writes them (``train/loss``, ``val/accuracy``).

    Args:
        directory: the run directory (W&B writes its ``wandb/`` folder there).
        project: the W&B project (``logging.experiment``).
        run_name: the W&B run's name (the run directory's name).
        mode: ``offline``, ``online`` or ``disabled`` (``wandb.init(mode=...)``).
    """

    def __init__(self, directory: Path, project: str, run_name: str, mode: str = "offline"):
        wandb = require("wandb", extra="wandb", purpose="logging to Weights & Biases")
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(project=project, name=run_name, dir=str(directory), mode=mode, reinit=True)

    def log_params(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], *, step: int, stage: str) -> None:
        self.run.log({metric_tag(key, stage, "/"): float(value) for key, value in metrics.items()}, step=step)

    def log_artifact(self, path: Path) -> None:
        path = Path(path)
        artifact = self.wandb.Artifact(name=f"{self.run.name or 'run'}-{path.name}".replace("/", "-"), type="model")
        if path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def close(self) -> None:
        self.run.finish()
