"""The learning-rate range test: a sweep on the trainer's own steps, everything put back, a documented suggestion."""

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from tightfit.cli import main
from tightfit.training.lr_finder import find_learning_rate, smooth_losses, suggest_learning_rate
from tightfit.training.trainer import Trainer

QUIET = ["logging.console=false", "monitor.enabled=false", "threads=1", "data.limit=150", "lr_find.num_steps=25"]


def make_trainer(tmp_path, **settings) -> Trainer:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(128, 6, generator=generator)
    data = TensorDataset(inputs, (inputs[:, 0] + inputs[:, 1] > 0).long())
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2)
    )  # buffers, RNG
    config = {
        "run_dir": str(tmp_path),
        "epochs": 2,
        "seed": 3,
        "threads": 1,
        "batch": {"micro_batch_size": 16},
        "schedule": {"name": "cosine", "warmup_steps": 2},
        "lr_find": {"num_steps": 30, "max_lr": 10.0},
        "logging": {"console": False, "tensorboard": False},
        "monitor": {"enabled": False},
        **settings,
    }
    return Trainer(config, model=model, datasets=(data, data, None))


def test_the_sweep_puts_weights_optimizer_counters_and_rng_back(tmp_path):
    trainer = make_trainer(tmp_path, optimizer={"lr": 1e-3})
    trainer.setup()
    weights = {name: tensor.clone() for name, tensor in trainer.model.state_dict().items()}
    lr_before = trainer.optimizer.param_groups[0]["lr"]
    torch.manual_seed(11)
    expected_draw = torch.rand(3)
    torch.manual_seed(11)
    result = find_learning_rate(trainer, min_lr=1e-5, max_lr=10.0, num_steps=30)
    assert len(result.lrs) >= 10 and result.lrs[0] == pytest.approx(1e-5)
    assert np.all(np.diff(np.log(result.lrs)) == pytest.approx(np.log(1e6) / 29))  # exponential
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    assert trainer.optimizer.state_dict()["state"] == {} and trainer.optimizer.param_groups[0]["lr"] == lr_before
    assert trainer.global_step == 0 and trainer.samples_seen == 0 and trainer.guard.skipped_steps == 0
    assert torch.equal(torch.rand(3), expected_draw)


def test_lr_auto_trains_exactly_as_the_found_rate_given_by_hand(tmp_path):
    found = make_trainer(tmp_path / "auto", optimizer={"lr": "auto"})
    summary = found.fit()
    chosen = summary["lr"]
    assert summary["lr_find"]["suggestion"] == chosen and "steepest descent" in summary["lr_find"]["reason"]
    assert json.loads((tmp_path / "auto" / "lr_find.json").read_text())["suggestion"] == chosen
    by_hand = make_trainer(tmp_path / "hand", optimizer={"lr": chosen}).fit()
    assert by_hand["lr_find"] is None
    assert summary["best_metric"]["value"] == by_hand["best_metric"]["value"]  # the sweep left no trace


def test_a_resumed_lr_auto_run_keeps_its_rate_without_searching_again(tmp_path, monkeypatch):
    first = make_trainer(tmp_path, optimizer={"lr": "auto"}, max_steps=5).fit()

    def no_second_sweep(*args, **kwargs):
        raise AssertionError("a resumed run searched again")

    monkeypatch.setattr("tightfit.training.lr_finder.find_learning_rate", no_second_sweep)
    resumed = make_trainer(tmp_path, optimizer={"lr": "auto"}, max_steps=10)
    resumed.setup(resume_from=tmp_path)
    assert resumed.global_step == 5 and resumed.base_lr == first["lr"]  # from the checkpoint, not a new sweep
    summary = resumed.fit()
    assert summary["steps"] == 10 and summary["lr"] == first["lr"] and summary["lr_find"] == first["lr_find"]


def test_the_suggestion_is_the_steepest_point_of_a_lag_free_smoothing():
    log_lrs = np.linspace(-6, 0, 100)
    clean = 2.3 - 2.0 / (1 + np.exp(-(log_lrs + 2.5) * 3))  # steepest at 10^-2.5
    clean[log_lrs > -0.8] += (log_lrs[log_lrs > -0.8] + 0.8) * 8  # divergence at the end
    noisy = clean + np.random.default_rng(0).normal(0, 0.05, 100)
    suggestion, _, reason, smoothed = suggest_learning_rate(list(10**log_lrs), list(noisy))
    assert abs(np.log10(suggestion) + 2.5) < 0.2 and "steepest descent" in reason
    # a running average (beta 0.98, bias-corrected: Lightning's) lags: its curve is still high past the drop
    average, running = 0.0, []
    for step, value in enumerate(noisy):
        average = 0.98 * average + 0.02 * value
        running.append(average / (1 - 0.98 ** (step + 1)))
    at_true_steepest = int(np.argmin(np.abs(log_lrs + 2.5)))
    assert (
        abs(smoothed[at_true_steepest] - clean[at_true_steepest])
        < 0.1
        < running[at_true_steepest] - clean[at_true_steepest]
    )
    assert smooth_losses([1.0, 1.0, 1.0, 1.0]) == pytest.approx([1.0] * 4)  # normalised at the edges


def test_no_suggestion_when_the_loss_never_falls():
    rates = list(np.logspace(-6, 0, 50))
    assert suggest_learning_rate(rates, list(np.linspace(1, 3, 50)))[:3] == (
        None,
        None,
        "the loss rose from the first steps: lower min_lr (now 1e-06)",
    )
    assert "the loss never changed" in suggest_learning_rate(rates, [0.7] * 50)[2]
    assert "only 5 steps" in suggest_learning_rate([1e-6, 1e-5, 1e-4, 1e-3, 1e-2], [1, 1, 1, 1, 1])[2]


def test_cli_lr_find_json_and_plot_leave_no_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["lr-find", *QUIET, "--json", "--plot", str(tmp_path / "lr.png")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["suggestion"] is not None and result["min_lr"] <= result["suggestion"] <= result["max_lr"]
    assert len(result["lrs"]) == len(result["losses"]) == len(result["smoothed"]) <= 25
    assert (tmp_path / "lr.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["lr.png"]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--plot", "lr.txt"], "--plot lr.txt: expected a .png file name"),
        (["--plot", "no/such/lr.png"], "--plot no/such/lr.png: the folder no/such does not exist"),
        (["lr_find.min_lr=2"], "lr_find (on the command line): min_lr 2.0 must be below max_lr 1.0"),
        (["lr_find.num_steps=3"], "lr_find.num_steps (on the command line)"),
        (["optimizer.lr=fast"], "optimizer.lr (on the command line): should be a valid number or 'auto' (got 'fast')"),
    ],
)
def test_cli_lr_find_bad_input_is_one_line(tmp_path, monkeypatch, capsys, arguments, message):
    monkeypatch.chdir(tmp_path)
    assert main(["lr-find", *QUIET, *arguments]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error and list(tmp_path.iterdir()) == []


def test_cli_train_with_lr_auto_draws_the_sweep_beside_the_curves(tmp_path, capsys):
    run_dir = tmp_path / "run"
    arguments = [
        "train",
        "optimizer.lr=auto",
        "epochs=1",
        *QUIET,
        "logging.tensorboard=false",
        "--run-dir",
        str(run_dir),
        "--json",
    ]
    assert main(arguments) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (
        summary["lr"]
        == summary["lr_find"]["suggestion"]
        == json.loads((run_dir / "lr_find.json").read_text())["suggestion"]
    )
    assert (run_dir / "lr_find.png").read_bytes()[:4] == b"\x89PNG"


def test_lr_auto_without_a_suggestion_is_a_one_line_error_before_anything_is_written(tmp_path):
    from tightfit.errors import ConfigError

    class Stuck(nn.Module):  # its one trainable parameter is in the graph with a zero gradient
        def __init__(self):
            super().__init__()
            self.frozen = nn.Linear(6, 2).requires_grad_(False)
            self.stuck = nn.Parameter(torch.zeros(1))

        def forward(self, inputs):
            return self.frozen(inputs) + 0 * self.stuck

    trainer = make_trainer(
        tmp_path / "run", optimizer={"lr": "auto"}, batch={"micro_batch_size": 128}
    )  # one window: no batch noise
    trainer.user_model = Stuck()
    with pytest.raises(ConfigError, match="optimizer.lr: auto found no rate: the loss never changed"):
        trainer.setup()
    assert not (tmp_path / "run").exists()


def test_lr_find_from_python_leaves_nothing_behind(tmp_path, monkeypatch):
    import tightfit

    monkeypatch.chdir(tmp_path)
    result = tightfit.lr_find({"data": {"limit": 150}, "threads": 1, "lr_find": {"num_steps": 20}})
    assert result.suggestion is not None and len(result.lrs) <= 20 and list(tmp_path.iterdir()) == []
