"""Loggers: what TensorBoard, MLflow and the JSON-lines file hold after a run, read back by their
own readers."""

import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from tightfit.training.loggers import ConsoleLogger, JsonlLogger, flatten, metric_tag
from tightfit.training.trainer import Trainer


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(48, 4, generator=generator)
    data = TensorDataset(inputs, (inputs[:, 0] > 0).long())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    config = {
        "run_dir": str(run_dir),
        "epochs": 2,
        "batch": {"micro_batch_size": 8},
        "optimizer": {"name": "adam", "lr": 0.01},
        "logging": {"console": False, "tensorboard": True, "mlflow": True, "every_n_steps": 2, "experiment": "unit"},
        "monitor": {"interval_s": 0.05},
        "threads": 1,
    }
    summary = Trainer(config, model=model, datasets=(data, data, data)).fit()
    return run_dir, summary


def test_tensorboard_event_files_hold_loss_lr_metrics_memory_and_throughput(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, summary = finished_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "train/loss",
        "train/lr",
        "train/samples_per_s",
        "val/loss",
        "val/accuracy",
        "test/accuracy",
        "memory/rss_bytes",
    } <= tags
    train_steps = [event.step for event in events.Scalars("train/loss")]
    assert train_steps == [1, 2, 4, 6, 8, 10, 12]
    assert [event.step for event in events.Scalars("val/loss")] == [6, 12]
    assert events.Scalars("test/accuracy")[0].value == pytest.approx(summary["test_accuracy"])
    assert events.Scalars("memory/rss_bytes")[0].value > 10 * 2**20


def test_mlflow_file_store_holds_params_metrics_and_the_best_checkpoint(finished_run):
    from mlflow.tracking import MlflowClient

    run_dir, summary = finished_run
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("unit")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert run.data.params["optimizer.name"] == "adam" and run.data.params["batch.micro_batch_size"] == "8"
    assert run.data.metrics["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert [metric.step for metric in history] == [6, 12]
    artifacts = [item.path for item in client.list_artifacts(run.info.run_id, "best")]
    assert "best/model.safetensors" in artifacts


def test_jsonl_has_one_parseable_record_per_log_call(finished_run):
    run_dir, summary = finished_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    stages = [record["stage"] for record in records]
    assert stages.count("val") == 2 and stages.count("test") == 1 and stages.count("train") == 7
    train = next(record for record in records if record["stage"] == "train")
    assert {"train_loss", "lr", "grad_norm", "samples_per_s", "memory/rss_bytes", "step", "time"} <= train.keys()


def test_logger_helpers(tmp_path, capsys):
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
    assert metric_tag("val_loss", "val", "/") == "val/loss"
    assert metric_tag("lr", "train", "_") == "train_lr"
    assert metric_tag("memory/rss_bytes", "train", "/") == "memory/rss_bytes"
    logger = JsonlLogger(tmp_path / "m.jsonl")
    logger.log_metrics({"val_loss": 0.5}, step=3, stage="val")
    logger.close()
    assert json.loads((tmp_path / "m.jsonl").read_text())["val_loss"] == 0.5
    from rich.console import Console

    ConsoleLogger(Console(highlight=False)).log_metrics({"val_loss": 0.25, "val_accuracy": 0.9}, step=7, stage="val")
    assert "val_loss 0.25" in capsys.readouterr().out
