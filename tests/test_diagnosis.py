"""Silent failures read from the curves: a flat loss (against its noise), over- and under-fitting."""

import json
import math

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from tightfit.training.diagnosis import curve_findings, flat_loss_finding
from tightfit.training.trainer import Trainer


def noisy(levels, noise=0.04, seed=0):
    return (np.asarray(levels) + np.random.default_rng(seed).normal(0, noise, len(levels))).tolist()


def test_a_loss_inside_its_noise_is_flat_and_the_message_names_the_rate():
    finding = flat_loss_finding(noisy(np.full(100, 2.34)), first_step=13, lr=6e-13, base_lr=1e-12)
    assert finding["finding"] == "flat loss"
    assert "steps 13-112" in finding["evidence"] and "learning rate 1e-12 (6e-13 at step 112)" in finding["evidence"]
    assert "lr-find" in finding["advice"]


def test_what_a_start_versus_end_tolerance_got_wrong_and_slow_learning_is_not_flat():
    # 10-step means of this flat loss differ by more than 0.1 %: the old rule called it moving
    losses = noisy(np.full(100, 2.34))
    assert abs(np.mean(losses[:10]) - np.mean(losses[-10:])) > 1e-3 * 2.34
    assert flat_loss_finding(losses, first_step=1, lr=1e-12) is not None
    slow = noisy(np.linspace(2.34, 2.22, 100))  # lr 1e-5 on digits: 0.12 in 100 steps, noise 0.04
    assert flat_loss_finding(slow, first_step=1, lr=1e-5) is None
    assert (
        flat_loss_finding(noisy(np.full(100, 0.01), noise=0.002), first_step=13, lr=1e-3, start_loss=2.3) is None
    )  # solved in warm-up
    assert flat_loss_finding([2.3] * 19, first_step=1, lr=1.0) is None  # too short to say
    converged = noisy(np.full(100, 0.05), noise=0.01)  # fine-tuning a trained classifier: flat because done
    assert flat_loss_finding(converged, first_step=1, lr=1e-3, start_loss=0.06, num_classes=10) is None
    assert flat_loss_finding(converged, first_step=1, lr=1e-3, start_loss=0.06) is not None


def test_overfitting_needs_a_sustained_rise_of_val_loss_while_train_loss_falls():
    val = [2.2, 0.83, 0.75, 0.70, 0.72, 0.80, 0.79, 0.81, 0.83]
    train = [2.3, 0.64, 0.10, 0.013, 0.005, 0.003, 0.001, 0.0005, 0.0003]
    history = [
        {"step": 10 * (index + 1), "train_loss": t, "val_loss": v} for index, (t, v) in enumerate(zip(train, val))
    ]
    (finding,) = curve_findings(history, start_loss=2.3, num_classes=10, lr=3e-3)
    assert (
        finding["finding"] == "overfitting"
        and "from 0.7233 around step 40 to 0.81 at step 90 (+12 %)" in finding["evidence"]
    )
    assert "would stop near step 40" in finding["advice"]
    healthy = [
        {"step": index, "train_loss": 1 / (index + 1), "val_loss": 1.2 / (index + 1) + 0.03} for index in range(12)
    ]
    assert curve_findings(healthy, start_loss=2.3, num_classes=10, lr=3e-3) == []
    # the LoRA text recipe: one lucky low validation, then a plateau (+29 % on the point, +8 % on means of three)
    lucky = [
        1.34,
        0.6168,
        0.2566,
        0.2015,
        0.105,
        0.1428,
        0.1283,
        0.1276,
        0.1329,
        0.1248,
        0.1296,
        0.1342,
        0.1361,
        0.135,
        0.1349,
    ]
    plateau = [
        {"step": 15 * (index + 1), "train_loss": 1.0 / (index + 1) ** 2, "val_loss": value}
        for index, value in enumerate(lucky)
    ]
    assert curve_findings(plateau, start_loss=1.4, num_classes=4, lr=1e-3) == []


def test_underfitting_is_high_and_close_train_and_val_losses():
    stuck = [{"step": 20 * (index + 1), "train_loss": 1.17, "val_loss": 1.18} for index in range(12)]
    (finding,) = curve_findings(stuck, start_loss=2.3, num_classes=10, lr=1e-4)
    assert (
        finding["finding"] == "underfitting"
        and f"half the chance level ln(10) = {math.log(10):.3g}" in finding["evidence"]
    )
    assert "higher learning rate than 0.0001" in finding["advice"]
    regression = [{"step": index, "train_loss": 0.9, "val_loss": 1.0} for index in range(3)]
    assert curve_findings(regression, start_loss=1.0, num_classes=None, lr=1e-3)[0]["finding"] == "underfitting"
    gap = [{"step": index, "train_loss": 1.5, "val_loss": 2.2} for index in range(3)]  # high but far apart: not this
    assert curve_findings(gap, start_loss=2.3, num_classes=10, lr=1e-3) == []


def test_a_run_at_lr_1e_12_warns_during_the_run_and_puts_the_findings_in_the_summary(tmp_path, capsys):
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(256, 8, generator=generator)
    data = TensorDataset(inputs, (inputs[:, 0] > 0).long() + (inputs[:, 1] > 0).long())
    torch.manual_seed(0)
    settings = {
        "run_dir": str(tmp_path),
        "epochs": 6,
        "threads": 1,
        "optimizer": {"lr": 1e-12},
        "batch": {"micro_batch_size": 32},
        "numerics": {"flat_loss_steps": 20},
        "logging": {"tensorboard": False, "progress": False},
        "monitor": {"enabled": False},
    }
    summary = Trainer(
        settings, model=nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), datasets=(data, data, None)
    ).fit()
    printed = capsys.readouterr().out
    assert "warning: flat loss" in printed and "learning rate 1e-12" in printed
    findings = json.loads((tmp_path / "summary.json").read_text())["diagnosis"]
    assert (
        [item["finding"] for item in findings]
        == ["flat loss", "underfitting"]
        == [item["finding"] for item in summary["diagnosis"]]
    )
