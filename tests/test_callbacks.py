"""Callbacks: the order events fire in, early stopping, and last/best/every-N/top-k checkpoints."""

import json
import shutil

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from tightfit.runs import checkpoint as checkpoint_files
from tightfit.training.callbacks import EarlyStopping, is_improvement
from tightfit.training.trainer import Trainer


def periodic_names(run_dir) -> list[str]:
    """The step-N / epoch-N checkpoints of a run, oldest first."""
    found = [path for path in (run_dir / "checkpoints").iterdir() if path.name.split("-")[0] in ("step", "epoch")]
    return [path.name for path in sorted(found, key=lambda path: json.loads((path / "meta.json").read_text())["step"])]


def make_data(samples: int = 32) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(samples, 4, generator=generator)
    return TensorDataset(inputs, (inputs[:, 0] > 0).long())


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def config(run_dir, **settings) -> dict:
    base = {
        "run_dir": str(run_dir),
        "epochs": 2,
        "batch": {"micro_batch_size": 8},
        "optimizer": {"name": "sgd", "lr": 0.1},
        "schedule": {"name": "constant"},
        "logging": {"console": False, "tensorboard": False},
        "monitor": {"enabled": False},
        "threads": 1,
    }
    return {**base, **settings}


class Recorder:
    """Records every event it receives, by name."""

    def __init__(self):
        self.events: list[str] = []

    def __getattr__(self, name):
        if not name.startswith("on_"):
            raise AttributeError(name)
        return lambda trainer, *args: self.events.append(name)


def test_events_fire_in_the_documented_order(tmp_path):
    recorder = Recorder()
    data = make_data(16)  # two steps an epoch
    Trainer(config(tmp_path), model=make_model(), datasets=(data, data, data), callbacks=[recorder]).fit()
    epoch = ["on_epoch_start", "on_step_end", "on_step_end", "on_validation_end", "on_epoch_end"]
    assert recorder.events == ["on_fit_start", *epoch, *epoch, "on_fit_end"]


def test_exception_event_fires_when_a_step_raises(tmp_path):
    recorder = Recorder()

    class Broken(nn.Module):
        def forward(self, inputs):  # passes the one-sample check before the run (eval mode), fails in the step
            if self.training:
                raise ValueError("broken model")
            return self.weight.expand(len(inputs), 2)

    broken = Broken()
    broken.weight = nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="broken model"):
        Trainer(config(tmp_path), model=broken, datasets=(make_data(), None, None), callbacks=[recorder]).fit()
    assert recorder.events == ["on_fit_start", "on_epoch_start", "on_exception"]


@pytest.mark.parametrize(
    "value, best, mode, min_delta, expected",
    [
        (0.5, None, "min", 0.0, True),
        (0.5, 0.6, "min", 0.0, True),
        (0.59, 0.6, "min", 0.05, False),
        (0.7, 0.6, "max", 0.05, True),
        (float("nan"), 1.0, "min", 0.0, False),
    ],
)
def test_is_improvement(value, best, mode, min_delta, expected):
    assert is_improvement(value, best, mode, min_delta) is expected


def test_early_stopping_counts_patience_with_min_delta():
    class Stub:
        should_stop = False
        stop_reason = None

    trainer, stopping = Stub(), EarlyStopping(monitor="val_loss", mode="min", patience=2, min_delta=0.01)
    for loss in (1.0, 0.995, 0.9, 0.899, 0.898):
        assert not trainer.should_stop
        stopping.on_validation_end(trainer, {"val_loss": loss})
    assert trainer.should_stop and stopping.best == 0.9 and "did not improve" in trainer.stop_reason


def test_early_stopping_stops_the_run_and_restores_the_best_weights(tmp_path):
    data = make_data()

    class Diverge:
        """After the first epoch, push the weights away so validation gets worse and worse."""

        def on_epoch_end(self, trainer, metrics):
            if trainer.epoch >= 1:
                with torch.no_grad():
                    for parameter in trainer.model.parameters():
                        parameter.add_(0.5 * trainer.epoch)

    settings = {"early_stopping": {"enabled": True, "monitor": "val_loss", "patience": 2}, "epochs": 20}
    trainer = Trainer(
        config(tmp_path, **settings), model=make_model(), datasets=(data, data, None), callbacks=[Diverge()]
    )
    summary = trainer.fit()
    assert summary["epochs"] < 20 and "early stopping" in summary["stop_reason"]
    best_loss = summary["best_metric"]["value"]
    assert trainer.evaluate("val")["val_loss"] == pytest.approx(best_loss, rel=1e-5)  # restored
    last = json.loads((tmp_path / "checkpoints" / "last" / "meta.json").read_text())
    assert last["step"] == summary["steps"]


def test_top_k_keeps_the_k_best_and_every_n_steps_keeps_step_checkpoints_beside_last(tmp_path):
    data = make_data(64)
    seen_last_steps = []

    class WatchLast:
        def on_step_end(self, trainer, metrics):
            meta = tmp_path / "checkpoints" / "last" / "meta.json"
            if meta.exists():
                seen_last_steps.append(json.loads(meta.read_text())["step"])

    settings = {
        "checkpoint": {"every_n_steps": 3, "keep_top_k": 2, "monitor": "val_accuracy", "mode": "max"},
        "epochs": 4,
        "eval_every_n_steps": 2,
    }
    trainer = Trainer(
        config(tmp_path, **settings), model=make_model(), datasets=(data, data, None), callbacks=[WatchLast()]
    )
    trainer.fit()
    # every_n_steps keeps step-N checkpoints (mid-epoch: 8 steps an epoch) and leaves "last" to the epoch ends
    assert seen_last_steps and all(step % 8 == 0 for step in seen_last_steps)
    assert periodic_names(tmp_path) == [f"step-{step}" for step in range(3, 33, 3)]
    assert json.loads((tmp_path / "checkpoints" / "step-6" / "meta.json").read_text())["step"] == 6
    kept = sorted((tmp_path / "checkpoints" / "top-k").iterdir())
    assert len(kept) == 2
    values = sorted(float(path.name.rsplit("-", 1)[1]) for path in kept)
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    all_values = sorted(round(line["val_accuracy"], 4) for line in history if line["stage"] == "val")
    assert values[-1] == all_values[-1] and values[0] >= all_values[-2] - 1e-9
    for path in kept:
        assert (path / "model.safetensors").is_file()


def test_every_n_epochs_keeps_epoch_checkpoints_and_keep_periodic_drops_the_oldest(tmp_path):
    data = make_data(64)
    settings = {"checkpoint": {"every_n_epochs": 1, "every_n_steps": 3, "keep_periodic": 3}, "epochs": 2}
    Trainer(config(tmp_path, **settings), model=make_model(), datasets=(data, data, None)).fit()
    names = periodic_names(tmp_path)
    # 16 steps: step-3, step-6, epoch-1 (step 8), step-9, step-12, step-15, epoch-2 (step 16); the newest three stay
    assert names == ["step-12", "step-15", "epoch-2"]
    meta = json.loads((tmp_path / "checkpoints" / "epoch-2" / "meta.json").read_text())
    assert meta["step"] == 16 and meta["epoch_finished"]
    assert (tmp_path / "checkpoints" / "epoch-2" / "state.pt").is_file()  # resumable, not weights only
    assert checkpoint_files.checkpoint_folders(tmp_path / "checkpoints")[0].name == "last"  # same step: last first


def test_resume_continues_from_a_step_checkpoint_newer_than_last(tmp_path):
    data = make_data(64)
    settings = {"checkpoint": {"every_n_steps": 3}, "epochs": 2, "max_steps": 12}
    Trainer(config(tmp_path, **settings), model=make_model(), datasets=(data, data, None)).fit()
    shutil.rmtree(tmp_path / "checkpoints" / "last")  # as if killed after step-12, before the run's end
    (tmp_path / "summary.json").unlink()
    assert checkpoint_files.checkpoint_folders(tmp_path / "checkpoints")[0].name == "step-12"
    resumed = Trainer(
        config(tmp_path, **{**settings, "max_steps": 16}), model=make_model(), datasets=(data, data, None)
    )
    summary = resumed.fit(resume_from=tmp_path)
    assert summary["steps"] == 16


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "checkpoint.every_n_epochs=0",
            "checkpoint.every_n_epochs (on the command line): should be greater than or equal to 1 (got 0)",
        ),
        (
            "checkpoint.keep_periodic=0",
            "checkpoint.keep_periodic (on the command line): should be greater than or equal to 1 (got 0)",
        ),
        (
            "checkpoint.every_n_epoch=2",
            "checkpoint.every_n_epoch (on the command line): unknown key; did you mean 'every_n_epochs'?",
        ),
        (
            "numerics.flat_loss_steps=5",
            "numerics.flat_loss_steps (on the command line): should be greater than or equal to 20 (got 5)",
        ),
        (
            "schedule.min_lr_ratio=2",
            "schedule.min_lr_ratio (on the command line): should be less than or equal to 1 (got 2)",
        ),
    ],
)
def test_bad_periodic_and_diagnosis_settings_are_one_line(tmp_path, capsys, override, message):
    from tightfit.cli import main

    assert main(["train", override, "--run-dir", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error and not (tmp_path / "run").exists()


class Counter:
    """A callback with state: how many steps it has seen (saved and restored by name)."""

    state_key = "step-counter"

    def __init__(self):
        self.steps = 0

    def on_step_end(self, trainer, metrics):
        self.steps += 1

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]


def test_callback_state_is_restored_by_name_when_the_callback_set_changes(tmp_path):
    data = make_data(32)  # four steps an epoch
    first = Trainer(
        config(
            tmp_path,
            epochs=1,
            early_stopping={"enabled": True, "patience": 5},
            logging={"console": True, "progress": True, "tensorboard": False},
        ),
        model=make_model(),
        datasets=(data, data, None),
        callbacks=[Counter()],
    )
    first.fit()
    saver = next(callback for callback in first.callbacks if type(callback).__name__ == "ModelCheckpoint")
    # resume with early stopping off and no progress bar (--json): the positions of the callbacks
    # change, each must still get its own state back
    counter = Counter()
    second = Trainer(config(tmp_path, epochs=2), model=make_model(), datasets=(data, data, None), callbacks=[counter])
    second.setup(resume_from=tmp_path)
    resumed_saver = next(callback for callback in second.callbacks if type(callback).__name__ == "ModelCheckpoint")
    assert counter.steps == 4
    assert resumed_saver.best == saver.best and resumed_saver.best_path == saver.best_path
    second.fit()
    assert counter.steps == 8
