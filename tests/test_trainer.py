"""The training loop: the default recipe, accumulation, schedules, precision, checkpointing,
out-of-memory recovery, the numerics guard, the monitor and the Python API."""

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import tightfit
from tightfit.cli import main
from tightfit.errors import ConfigError
from tightfit.step.batch import count_samples, slice_batch
from tightfit.training.numerics import NumericsError, NumericsGuard, likely_cause
from tightfit.training.schedules import lr_factor_function
from tightfit.training.trainer import Trainer


def make_data(samples: int = 48, features: int = 6, classes: int = 3, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, features, generator=generator)
    targets = (inputs[:, 0] > 0).long() + (inputs[:, 1] > 0.5).long()
    return TensorDataset(inputs, targets % classes)


def make_mlp(seed: int = 0, features: int = 6, classes: int = 3, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, classes))


def quiet(run_dir, **settings) -> dict:
    """A small run's config: no console, no TensorBoard, no monitor thread."""
    config = {
        "run_dir": str(run_dir),
        "logging": {"console": False, "tensorboard": False},
        "monitor": {"enabled": False},
        "optimizer": {"name": "sgd", "lr": 0.1, "weight_decay": 0.0},
        "schedule": {"name": "constant"},
        "epochs": 2,
        "threads": 1,  # tiny models: one thread is faster, and robust on a busy machine
    }
    for key, value in settings.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def parameters_of(model: nn.Module) -> list[torch.Tensor]:
    return [parameter.detach().clone() for parameter in model.parameters()]


def test_default_recipe_trains_digits_to_97_percent_and_writes_the_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--run-dir", str(run_dir), "logging.progress=false", "monitor.interval_s=0.2"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.97
    assert summary["test_loss"] < 0.2
    assert summary["best_metric"]["name"] == "val_loss" and summary["best_metric"]["value"] < 0.2
    assert summary["steps"] == 12 * math.ceil(summary["samples_seen"] / 12 / 64)
    assert summary["peak_memory_bytes"]["process_rss"] > 50 * 2**20
    assert (run_dir / "checkpoints" / "best" / "model.safetensors").is_file()
    assert summary["best_checkpoint"] == str(run_dir / "checkpoints" / "best")
    assert (run_dir / "config.yaml").read_text().startswith("model: builtin:digits-cnn")
    assert (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "test_accuracy" in printed and str(run_dir) in printed


def test_accumulation_gives_the_same_weights_as_one_large_batch(tmp_path):
    data = make_data(samples=25)  # windows of 10, 10 and a last partial window of 5
    large = Trainer(
        quiet(tmp_path / "large", batch={"micro_batch_size": 10}), model=make_mlp(), datasets=(data, None, None)
    )
    large.fit()
    accumulated = Trainer(
        quiet(tmp_path / "small", batch={"micro_batch_size": 3, "effective_batch_size": 10}),
        model=make_mlp(),
        datasets=(data, None, None),
    )
    accumulated.fit()
    assert accumulated.accumulation_steps == 4 and accumulated.global_step == large.global_step == 6
    for expected, actual in zip(large.model.parameters(), accumulated.model.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    changed = any(not torch.equal(a, b) for a, b in zip(make_mlp().parameters(), large.model.parameters()))
    assert changed


def test_batch_helpers_keep_the_batch_form():
    pair = (torch.arange(10).view(5, 2), torch.arange(5))
    assert count_samples(pair) == 5
    first, targets = slice_batch(pair, 1, 3)
    assert first.tolist() == [[2, 3], [4, 5]] and targets.tolist() == [1, 2]
    mapping = {"input_ids": torch.ones(4, 7), "labels": torch.zeros(4, 7)}
    assert slice_batch(mapping, 0, 2)["input_ids"].shape == (2, 7)


@pytest.mark.parametrize("name", ["constant", "constant-warmup", "linear", "cosine", "exponential", "step"])
def test_schedules_have_the_documented_shape(name):
    factor = lr_factor_function(
        name, total_steps=100, warmup_steps=10 if name != "constant" else 0, min_lr_ratio=0.1, gamma=0.5, step_size=20
    )
    if name != "constant":
        assert factor(0) == pytest.approx(0.1) and factor(4) == pytest.approx(0.5) and factor(9) == pytest.approx(1.0)
    if name in ("constant", "constant-warmup"):
        assert factor(50) == factor(99) == 1.0
    if name == "linear":
        assert (
            factor(10) == pytest.approx(1.0) and factor(55) == pytest.approx(0.55) and factor(100) == pytest.approx(0.1)
        )
    if name == "cosine":
        assert factor(55) == pytest.approx(0.55) and factor(100) == pytest.approx(0.1) and factor(30) > factor(31)
    if name == "step":
        assert factor(19) == 1.0 and factor(20) == 0.5 and factor(40) == 0.25
    if name == "exponential":
        assert factor(20) == pytest.approx(0.5) and factor(30) == pytest.approx(0.5**1.5)


def test_schedule_steps_once_per_optimizer_step_not_per_micro_batch(tmp_path):
    config = quiet(
        tmp_path,
        batch={"micro_batch_size": 2, "accumulation_steps": 4},
        schedule={"name": "linear", "warmup_steps": 0, "min_lr_ratio": 0.0},
        epochs=1,
    )
    trainer = Trainer(config, model=make_mlp(), datasets=(make_data(48), None, None))
    trainer.fit()
    assert trainer.global_step == 6
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # 6 of 6 steps: decayed to 0
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first = next(line for line in history if line["stage"] == "train")
    assert first["lr"] == pytest.approx(0.1)


def test_reduce_on_plateau_lowers_the_rate_when_validation_stalls(tmp_path):
    data = make_data(32)
    config = quiet(
        tmp_path,
        optimizer={"lr": 1e-6},  # nothing moves: validation loss is flat
        schedule={"name": "reduce-on-plateau", "patience": 0, "factor": 0.5, "monitor": "val_loss"},
        epochs=3,
    )
    trainer = Trainer(config, model=make_mlp(), datasets=(data, data, None))
    trainer.fit()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-6 * 0.5**2)


def test_precision_auto_on_cpu_is_fp32_and_bf16_autocast_trains(tmp_path):
    data = make_data()
    auto = Trainer(quiet(tmp_path / "auto"), model=make_mlp(), datasets=(data, data, None))
    assert auto.fit()["precision"] == "fp32"
    bf16 = Trainer(quiet(tmp_path / "bf16", precision="bf16", epochs=3), model=make_mlp(), datasets=(data, data, None))
    summary = bf16.fit()
    assert summary["precision"] == "bf16" and math.isfinite(summary["best_metric"]["value"])
    assert next(bf16.model.parameters()).dtype == torch.float32  # autocast keeps fp32 master weights
    with pytest.raises(ConfigError, match="fp16"):
        Trainer(quiet(tmp_path / "fp16", precision="fp16"), model=make_mlp(), datasets=(data, None, None)).fit()


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, inputs):
        return torch.tanh(self.linear(inputs))


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(6, 8)
        self.blocks = nn.Sequential(Block(), Block(), Block())
        self.head = nn.Linear(8, 3)

    def forward(self, inputs):
        return self.head(self.blocks(self.embed(inputs)))


def test_activation_checkpointing_auto_wraps_blocks_and_keeps_the_result(tmp_path):
    data = make_data()
    plain = Trainer(quiet(tmp_path / "plain"), model=Stack(), datasets=(data, None, None))
    plain.fit()
    checkpointed = Trainer(quiet(tmp_path / "ckpt", checkpointing="auto"), model=Stack(), datasets=(data, None, None))
    checkpointed.fit()
    assert checkpointed.checkpointed_blocks == ["blocks.0", "blocks.1", "blocks.2"]
    for expected, actual in zip(plain.model.parameters(), checkpointed.model.parameters()):
        torch.testing.assert_close(actual, expected)


def test_clip_grad_norm_bounds_the_update(tmp_path):
    data = make_data(8)
    config = quiet(tmp_path, clip_grad_norm=1e-3, epochs=1, batch={"micro_batch_size": 8}, optimizer={"lr": 1.0})
    model = make_mlp()
    before = torch.cat([parameter.detach().flatten().clone() for parameter in model.parameters()])
    Trainer(config, model=model, datasets=(data, None, None)).fit()
    after = torch.cat([parameter.detach().flatten() for parameter in model.parameters()])
    assert (after - before).norm() == pytest.approx(1e-3, rel=1e-3)  # SGD lr 1: the update is the clipped gradient


class OutOfMemoryAbove(nn.Module):
    """An MLP that raises the real torch.OutOfMemoryError for batches larger than ``limit``."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.mlp = make_mlp()
        self.batch_sizes: list[int] = []

    def forward(self, inputs):
        self.batch_sizes.append(inputs.shape[0])
        if self.training and inputs.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"simulated: {inputs.shape[0]} samples do not fit")
        return self.mlp(inputs)


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_effective_batch(tmp_path):
    data = make_data(40)
    reference = Trainer(
        quiet(tmp_path / "reference", batch={"micro_batch_size": 16}), model=make_mlp(), datasets=(data, None, None)
    )
    reference.fit()
    model = OutOfMemoryAbove(limit=5)
    trainer = Trainer(quiet(tmp_path / "oom", batch={"micro_batch_size": 16}), model=model, datasets=(data, None, None))
    summary = trainer.fit()
    assert summary["oom_recoveries"] == 2 and summary["micro_batch_size"] == 4
    assert summary["effective_batch_size"] == 16 and summary["accumulation_steps"] == 4
    assert summary["steps"] == reference.global_step and summary["samples_seen"] == 80
    for expected, actual in zip(reference.model.parameters(), model.mlp.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_out_of_memory_under_a_simulated_cpu_budget_is_survived(tmp_path):
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 32, generator=generator), torch.randint(0, 4, (64,), generator=generator))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 4096), nn.ReLU(), nn.Linear(4096, 4))
    # The memory tracker counts ~1.8 MiB of weights, gradients and momentum; activations take
    # ~48 KiB a sample: 64 samples (4.2 MiB) pass a 3.5 MiB budget, 32 (2.7 MiB) do not.
    config = quiet(
        tmp_path, budget="3.5MiB", batch={"micro_batch_size": 64}, optimizer={"name": "sgd-momentum"}, epochs=2
    )
    summary = Trainer(config, model=model, datasets=(data, None, None)).fit()
    assert summary["oom_recoveries"] == 1
    assert (
        summary["micro_batch_size"] == 32
        and summary["accumulation_steps"] == 2
        and summary["effective_batch_size"] == 64
    )
    assert summary["steps"] == 2 and summary["samples_seen"] == 128


class PoisonAtCall(nn.Module):
    """An MLP whose output is NaN on the ``poison_call``-th training forward pass."""

    def __init__(self, poison_call: int):
        super().__init__()
        self.mlp = make_mlp()
        self.calls = 0
        self.poison_call = poison_call

    def forward(self, inputs):
        output = self.mlp(inputs)
        if self.training:
            self.calls += 1
            if self.calls == self.poison_call:
                return output * float("nan")
        return output


def test_numerics_guard_skips_a_nan_step_and_names_the_parameter(tmp_path, capsys):
    data = make_data(32)
    model = PoisonAtCall(poison_call=3)
    seen = {}

    class Snapshot:
        def on_step_end(self, trainer, metrics):
            seen[trainer.global_step] = (metrics["skipped"], parameters_of(model))

    config = quiet(tmp_path, batch={"micro_batch_size": 8}, epochs=1, logging={"console": True, "progress": False})
    summary = Trainer(config, model=model, datasets=(data, None, None), callbacks=[Snapshot()]).fit()
    assert summary["skipped_steps"] == 1 and seen[3][0] == 1.0 and seen[2][0] == 0.0
    for before, after in zip(seen[2][1], seen[3][1]):
        assert torch.equal(before, after)  # the NaN step changed nothing
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())
    printed = capsys.readouterr().out
    assert "step 3 skipped" in printed and "mlp.0.weight" in printed and "likely cause" in printed


def test_numerics_guard_stops_when_configured(tmp_path):
    config = quiet(tmp_path, batch={"micro_batch_size": 8}, numerics={"on_nonfinite": "stop"})
    with pytest.raises(NumericsError, match="mlp.0.weight"):
        Trainer(config, model=PoisonAtCall(poison_call=2), datasets=(make_data(32), None, None)).fit()


def test_numerics_guard_diagnoses_the_likely_cause(capsys):
    assert "clip_grad_norm" in likely_cause(float("nan"), [1.0, 1.1, 0.9, 50.0], None, 0.1)
    assert "too high" in likely_cause(float("nan"), [], None, 10.0)
    model = make_mlp()
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    guard = NumericsGuard()
    for _ in range(20):
        assert guard.check(model, 1.0, 0.0, lr=1e-3, clip_grad_norm=None) is None
    printed = capsys.readouterr().out
    assert printed.count("no gradient reached the parameters") == 1


def test_resource_monitor_samples_and_warns_before_memory_runs_out():
    from tightfit.training.monitor import ResourceMonitor

    warnings = []
    with ResourceMonitor(torch.device("cpu"), interval_s=0.01, warn_fraction=0.01, warn=warnings.append) as monitor:
        torch.ones(1000).sum()
    assert monitor.latest["memory/rss_bytes"] > 0 and monitor.peak_rss_bytes >= monitor.latest["memory/rss_bytes"]
    assert monitor.latest["memory/system_available_bytes"] > 0
    assert len(warnings) == 1 and "system memory" in warnings[0]


def test_python_api_train_with_overrides(tmp_path):
    summary = tightfit.train(
        None,
        run_dir=str(tmp_path),
        epochs=2,
        data__limit=200,
        logging__console=False,
        logging__tensorboard=False,
        threads=1,
    )
    assert summary["steps"] == 2 * math.ceil(200 / 64) and summary["run_dir"] == str(tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == summary["steps"]
    with pytest.raises(ConfigError, match="optimizer.lrr.*did you mean 'lr'"):
        tightfit.train(None, optimizer__lrr=0.1)


def test_max_steps_stops_mid_epoch_and_still_tests(tmp_path):
    data = make_data(64)
    trainer = Trainer(
        quiet(tmp_path, max_steps=3, batch={"micro_batch_size": 8}), model=make_mlp(), datasets=(data, data, data)
    )
    summary = trainer.fit()
    assert summary["steps"] == 3 and "test_accuracy" in summary and summary["best_checkpoint"]
    meta = json.loads((tmp_path / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["step"] == 3 and meta["epoch_finished"] is False


def test_micro_batch_size_auto_uses_the_memory_engine_and_fits_the_budget(tmp_path):
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 32, generator=generator), torch.randint(0, 4, (64,), generator=generator))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 4096), nn.ReLU(), nn.Linear(4096, 4))
    config = quiet(
        tmp_path,
        budget="3.5MiB",
        batch={"micro_batch_size": "auto", "effective_batch_size": 64},
        optimizer={"name": "sgd-momentum"},
        epochs=1,
    )
    summary = Trainer(config, model=model, datasets=(data, None, None)).fit()
    # 64 samples take 4.2 MiB of the tracker's count (see the test above): auto must stay below
    assert 1 <= summary["micro_batch_size"] < 64 and summary["oom_recoveries"] == 0
    assert summary["effective_batch_size"] == 64 and summary["accumulation_steps"] == math.ceil(
        64 / summary["micro_batch_size"]
    )
    assert summary["steps"] == 1


def test_lora_section_trains_only_adapters_and_saves_them(tmp_path):
    data = make_data(32)
    model = make_mlp()
    frozen_before = model[0].weight.detach().clone()
    config = quiet(tmp_path, lora={"rank": 2, "alpha": 4}, optimizer={"name": "adamw", "lr": 0.05}, epochs=2)
    trainer = Trainer(config, model=model, datasets=(data, None, None))
    trainer.fit()
    trainable = [name for name, parameter in trainer.model.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora_" in name or "modules_to_save" in name for name in trainable)
    base_weight = next(
        parameter for name, parameter in trainer.model.named_parameters() if name.endswith("0.base_layer.weight")
    )
    assert torch.equal(base_weight, frozen_before)  # the base stays frozen
    assert (tmp_path / "adapters" / "adapter_model.safetensors").is_file()


def test_grad_scaler_path_skips_a_nan_step_and_keeps_training(tmp_path):
    # fp16 GradScaler runs on CUDA/MPS; torch's CPU GradScaler exercises the same code path here.
    data = make_data(32)
    model = PoisonAtCall(poison_call=2)
    trainer = Trainer(quiet(tmp_path, batch={"micro_batch_size": 8}), model=model, datasets=(data, None, None))
    trainer.setup()
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    summary = trainer.fit()
    assert summary["steps"] == 8 and summary["skipped_steps"] == 1
    assert trainer.scaler.get_scale() < 2.0**4  # the NaN step lowered the scale
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())


def test_cli_json_prints_only_the_summary(tmp_path, capsys):
    assert (
        main(
            [
                "train",
                "--json",
                "--run-dir",
                str(tmp_path),
                "--limit",
                "60",
                "epochs=1",
                "threads=1",
                "logging.tensorboard=false",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)  # nothing but the JSON document on stdout
    assert summary["steps"] == 1 and summary["run_dir"] == str(tmp_path) and 0 <= summary["test_accuracy"] <= 1


@pytest.mark.gpu
@pytest.mark.gpu
def test_cuda_fp16_uses_a_grad_scaler_and_auto_picks_a_half_precision(tmp_path):
    data = make_data(64)
    fp16 = Trainer(
        quiet(tmp_path / "fp16", precision="fp16", device="cuda"), model=make_mlp(), datasets=(data, data, None)
    )
    summary = fp16.fit()
    assert fp16.scaler is not None and summary["precision"] == "fp16" and math.isfinite(summary["best_metric"]["value"])
    assert summary["peak_memory_bytes"]["cuda_allocated"] > 0
    auto = Trainer(quiet(tmp_path / "auto", device="cuda"), model=make_mlp(), datasets=(data, None, None))
    assert auto.fit()["precision"] in ("bf16", "fp16")


def test_reduce_on_plateau_stops_at_min_lr_ratio_of_the_base_rate():
    from tightfit.config import ScheduleConfig
    from tightfit.training.schedules import LRSchedule

    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.5)
    settings = ScheduleConfig(name="reduce-on-plateau", factor=0.1, patience=0, min_lr_ratio=0.02)
    schedule = LRSchedule(optimizer, settings, total_steps=10, steps_per_epoch=1)
    rates = []
    for _ in range(4):
        schedule.validated({"val_loss": 1.0})  # never improves
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx([0.5, 0.05, 0.01, 0.01])  # 0.005 would be below 0.02 x 0.5


def test_progress_in_a_captured_stdout_is_plain_lines_not_a_bar(tmp_path, capsys):
    import re

    from torch.utils.data import TensorDataset

    from tightfit.training.trainer import Trainer

    inputs = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    data = TensorDataset(inputs, (inputs[:, 0] > 0).long())
    config = quiet(tmp_path, batch={"micro_batch_size": 16}, logging={"console": True, "progress": True})
    Trainer(config, model=nn.Linear(4, 2), datasets=(data, data, None)).fit()
    printed = capsys.readouterr().out  # pytest's capture is not a terminal
    lines = [line for line in printed.splitlines() if line.startswith("epoch ") and " step " in line]
    assert [line.split(" loss ")[0] for line in lines] == ["epoch 1/2 step 4/4", "epoch 2/2 step 4/4"]
    assert all(re.fullmatch(r"epoch \d/2 step 4/4 loss \d+\.\d{4} \d+\.\d it/s eta 0:00", line) for line in lines), (
        lines
    )
    assert "━" not in printed and "\r" not in printed  # no redrawn bar
