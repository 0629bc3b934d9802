"""Learning-rate schedules, stepped once per optimizer step (not per micro-batch, not per epoch).

Names (seed-001's list): ``constant``, ``constant-warmup``, ``linear`` and ``cosine`` (both with
an optional linear warm-up, decaying to ``min_lr_ratio`` of the base rate at the last step),
``exponential`` (multiplied by ``gamma`` every ``step_size`` steps, smoothly), ``step``
(multiplied by ``gamma`` at every ``step_size`` steps), ``reduce-on-plateau`` (multiplied by
``factor`` when the monitored validation metric stalls for ``patience`` validations).
"""

import math
from collections.abc import Callable
from typing import Any

import torch

from tightfit.names import SCHEDULES  # noqa: F401  (re-exported; the list lives in names.py)


def lr_factor_function(
    name: str,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    gamma: float = 0.5,
    step_size: int = 1,
) -> Callable[[int], float]:
    """The multiplier of the base learning rate after ``step`` optimizer steps, for a named schedule.

    Args:
        name: one of ``SCHEDULES`` except ``reduce-on-plateau``.
        total_steps: the number of optimizer steps of the whole run (where decays end).
        warmup_steps: steps of linear warm-up from ``1/warmup_steps`` of the rate to the full rate.
        min_lr_ratio: the final multiplier of ``linear`` and ``cosine``.
        gamma: the decay of ``exponential`` and ``step`` per ``step_size`` steps.
        step_size: the period, in optimizer steps, of ``exponential`` and ``step``.

    Returns:
        A function ``step -> multiplier`` for ``torch.optim.lr_scheduler.LambdaLR``.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if name in ("constant", "constant-warmup"):
            return 1.0
        if name == "exponential":
            return gamma ** (step / step_size)
        if name == "step":
            return gamma ** (step // step_size)
        decay_steps = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        if name == "linear":
            return 1.0 - (1.0 - min_lr_ratio) * progress
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class LRSchedule:
    """The learning-rate schedule of a run: ``step()`` after each optimizer step, ``validated()``
    after each validation (only ``reduce-on-plateau`` listens to it).

    Args:
        optimizer: the optimizer whose rates it sets.
        config: the run's ``ScheduleConfig``.
        total_steps: optimizer steps in the whole run.
        steps_per_epoch: optimizer steps in one epoch (the default ``step_size``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: Any, *, total_steps: int, steps_per_epoch: int):
        self.name = config.name
        self.monitor = config.monitor
        if self.name == "reduce-on-plateau":
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode=config.mode, factor=config.factor, patience=config.patience
            )
            return
        warmup_steps = config.warmup_steps
        if warmup_steps is None:
            warmup_steps = round(config.warmup_fraction * total_steps)
        factor = lr_factor_function(
            self.name,
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            min_lr_ratio=config.min_lr_ratio,
            gamma=config.gamma,
            step_size=config.step_size or max(1, steps_per_epoch),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def step(self) -> None:
        """Advance by one optimizer step."""
        if self.name != "reduce-on-plateau":
            self.scheduler.step()

    def validated(self, metrics: dict[str, float]) -> None:
        """Feed a validation result to ``reduce-on-plateau`` (ignored by the other schedules)."""
        if self.name == "reduce-on-plateau" and self.monitor in metrics:
            self.scheduler.step(metrics[self.monitor])

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)
