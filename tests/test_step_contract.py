"""The contract of the memory engine: the plan is what ``train`` does.

The tracked peak of a real :class:`Trainer` step equals the estimator's peak for the same model and
settings, to the byte on CPU — because both run :class:`tightfit.step.step.TrainingStep`. Each case
changes one thing the step does: accumulation (a window of four micro-batches against the
engine's two), bf16 autocast, gradient clipping, activation checkpointing, LoRA adapters.
"""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from tightfit.memory.estimator import estimate_step
from tightfit.memory.tracker import MemoryTracker
from tightfit.training.trainer import Trainer

WIDTH, CLASSES, SAMPLES = 32, 5, 64


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down, self.norm = nn.Linear(WIDTH, 2 * WIDTH), nn.Linear(2 * WIDTH, WIDTH), nn.LayerNorm(WIDTH)

    def forward(self, x):
        return self.norm(x + self.down(torch.nn.functional.gelu(self.up(x))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(SAMPLES, WIDTH, generator=generator), torch.randint(0, CLASSES, (SAMPLES,), generator=generator)
    )


def batch_factory(batch_size: int, device) -> tuple:
    return torch.randn(batch_size, WIDTH, device=device), torch.randint(0, CLASSES, (batch_size,), device=device)


CASES = {
    "plain": {},
    "accumulation": {"batch": {"micro_batch_size": 4, "accumulation_steps": 4}},
    "bf16 autocast": {"precision": "bf16"},
    "clipping": {"clip_grad_norm": 1.0},
    "checkpointing": {"checkpointing": "auto"},
    "lora": {"lora": {"rank": 4, "target_modules": ["up", "down"]}},
    "everything": {
        "batch": {"micro_batch_size": 4, "accumulation_steps": 3},
        "precision": "bf16",
        "clip_grad_norm": 0.5,
        "checkpointing": "auto",
        "lora": {"rank": 4, "target_modules": ["up", "down"]},
    },
}


@pytest.mark.parametrize("settings", CASES.values(), ids=CASES.keys())
def test_trainer_step_peak_equals_the_estimate(tmp_path, settings):
    torch.manual_seed(0)
    config = {
        "run_dir": str(tmp_path),
        "epochs": 1,
        "threads": 1,
        "batch": {"micro_batch_size": 8},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "schedule": {"name": "constant"},
        "logging": {"console": False, "tensorboard": False, "jsonl": False},
        "monitor": {"enabled": False},
        **settings,
    }
    data = dataset()
    trainer = Trainer(config, model=Net(), datasets=(data, None, None))
    trainer.setup()
    windows = iter(trainer.loaders["train"])
    trainer.train_step(next(windows))  # warm-up: the optimizer state exists, as in the estimate
    window = next(windows)
    with MemoryTracker(trainer.model, trainer.optimizer, host_data=window) as tracker:
        trainer.train_step(window)

    estimate = estimate_step(
        trainer.model,
        batch_factory,
        batch_size=trainer.micro_batch_size,
        precision=trainer.precision,
        optimizer="adamw",
        accumulation_steps=trainer.accumulation_steps,
        clip_grad_norm=trainer.config.clip_grad_norm,
    )
    assert estimate.peak_bytes == tracker.peak_bytes
    assert estimate.breakdown == tracker.breakdown
    assert estimate.peak_moment == tracker.peak_moment and estimate.moment_peaks == tracker.moment_peaks
