"""Fine-tuning inside compression steps, through tightfit's own trainer (one training step).

Pruning, distillation and quantization-aware training all need a short fine-tune. None of them
owns a training loop: they hand the model to :class:`tightfit.training.trainer.Trainer`, with a
callback (the pruning schedule) or a model wrapper whose forward returns ``.loss`` (distillation).
Validation is left to the compression report, which measures every step on the held-out split, so
the trainer here runs on the training split alone and ends with the last weights (a "best"
checkpoint from earlier in a pruning schedule would undo the final sparsity).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from tightfit.errors import ConfigError


@dataclasses.dataclass
class FinetuneSettings:
    """How long and how hard a compression step fine-tunes.

    Attributes:
        epochs: passes over the training split.
        max_steps: stop after this many optimizer steps (``None``: run all epochs).
        lr: peak learning rate (cosine schedule, short warm-up).
        optimizer: an optimizer name of :func:`tightfit.step.optim.build_optimizer`.
        batch_size: micro-batch size.
        weight_decay: decoupled weight decay (AdamW) or L2.
        device: ``cpu``, ``cuda``, ``mps`` or ``auto``.
        seed: the run's seed.
    """

    epochs: int = 3
    max_steps: int | None = None
    lr: float = 1e-3
    optimizer: str = "adamw"
    batch_size: int = 64
    weight_decay: float = 0.0
    device: str = "cpu"
    seed: int = 0

    def planned_steps(self, train_size: int) -> int:
        """Optimizer steps the trainer will make on ``train_size`` samples."""
        per_epoch = max(1, -(-train_size // self.batch_size))
        steps = self.epochs * per_epoch
        return min(steps, self.max_steps) if self.max_steps else steps


def train_split_only(data: Any) -> Any:
    """The data with only its training split (a ``DataBundle`` keeps its collate function)."""
    if dataclasses.is_dataclass(data) and hasattr(data, "train"):
        return dataclasses.replace(data, val=None, test=None)
    if isinstance(data, Sequence):
        return (data[0], None, None)
    return (data, None, None)


def finetune(
    model: nn.Module,
    data: Any,
    settings: FinetuneSettings | None = None,
    *,
    callbacks: Sequence[Any] = (),
    run_dir: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Fine-tune ``model`` in place with the trainer on the training split of ``data``.

    Args:
        model: the model (any module whose output the shared loss rule understands).
        data: a ``DataBundle``, a ``(train, val, test)`` tuple or a training ``Dataset``.
        settings: epochs, steps, learning rate... (:class:`FinetuneSettings`).
        callbacks: trainer callbacks, e.g. the polynomial pruning schedule.
        run_dir: where the trainer writes its run (config, metrics, last checkpoint).
        progress: show the trainer's progress bar and log lines.

    Returns:
        The trainer's summary.

    Raises:
        ConfigError: when the trainer rejects the settings.
    """
    from tightfit.training.trainer import Trainer

    settings = settings or FinetuneSettings()
    if settings.epochs < 1:
        raise ConfigError(f"finetune: epochs must be at least 1; got {settings.epochs}")
    config = {
        "epochs": settings.epochs,
        "max_steps": settings.max_steps,
        "optimizer": {"name": settings.optimizer, "lr": settings.lr, "weight_decay": settings.weight_decay},
        "schedule": {"name": "cosine", "warmup_fraction": 0.05},
        "batch": {"micro_batch_size": settings.batch_size},
        "precision": "fp32",
        "device": settings.device,
        "seed": settings.seed,
        "run_dir": str(run_dir) if run_dir is not None else None,
        "logging": {"console": progress, "progress": progress, "tensorboard": False, "jsonl": True},
        "monitor": {"enabled": False},
    }
    trainer = Trainer(config, model=model, datasets=train_split_only(data), callbacks=callbacks)
    summary = trainer.fit()
    model.cpu()
    return summary
