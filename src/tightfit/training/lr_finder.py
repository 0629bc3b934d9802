"""The learning-rate range test (Smith, 2015): a short sweep that says where to set the rate.

The rate grows exponentially from ``min_lr`` to ``max_lr`` over ``num_steps`` real optimizer
steps of the run's own :meth:`Trainer.train_step` (its micro-batching, precision, clipping and
numerics guard), and the training loss is recorded at each. The sweep stops early when the
smoothed loss passes ``divergence`` times its minimum or stops being finite. Afterwards the
weights, the optimizer, the schedule, the gradient scaler, the numerics guard, the counters and
every random state are put back exactly: a run that finds its rate and then trains is the run
that would have trained at that rate from the start. Under torchrun the loss of each step is
averaged over the ranks, so every rank sees the same curve and picks the same rate.

The suggestion (``suggest_learning_rate``), a documented rule:

1. **Smooth without lag.** The losses are smoothed by a Gaussian kernel over the sweep's points
   (which are evenly spaced in log(lr)), with a width of ``n / 25`` points, normalised at the
   edges. Lightning (and fastai) smooth with a running average (beta 0.98): it lags the curve by
   about 50 steps, a large share of a 100-step sweep, so their curve, and their steepest point,
   sit to the right of the true one, at too high a rate.
2. **Slope against log(lr).** The steepest descent is taken in d(loss)/d(log lr), the axis the
   sweep is even in. Lightning differentiates against the rate itself: that divides every slope by
   the rate, so the noisy first points at tiny rates can win.
3. **Only the descent before the minimum** of the smoothed loss, past the first ``n / 20``
   points, counts; the steepest point there is the suggestion. None when the loss never fell.

Example:
    >>> trainer = Trainer(config); trainer.setup()
    >>> result = find_learning_rate(trainer)
    >>> result.suggestion
"""

import contextlib
import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from tightfit.errors import ConfigError
from tightfit.step.rng import rng_state, set_rng_state
from tightfit.training.numerics import NumericsError

_COUNTERS = (
    "global_step",
    "epoch",
    "samples_in_epoch",
    "samples_seen",
    "micro_batch_size",
    "accumulation_steps",
    "oom_recoveries",
)


@dataclass
class LRFindResult:
    """What a sweep found.

    Attributes:
        lrs: the rate of each step.
        losses: the training loss of each step.
        smoothed: the smoothed losses (see the module doc).
        suggestion: the suggested rate, or None.
        reason: how the suggestion was chosen, or why there is none.
        stopped_early: whether the loss diverged before ``max_lr``.
        min_lr, max_lr, num_steps: the sweep's settings.
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float | None
    reason: str
    stopped_early: bool
    min_lr: float
    max_lr: float
    num_steps: int
    suggestion_index: int | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def smooth_losses(losses: list[float], width: float | None = None) -> np.ndarray:
    """Gaussian-kernel smoothing over the points (no lag), normalised at the edges.

    Args:
        losses: the raw losses, one per sweep point.
        width: the kernel's standard deviation in points (default ``max(1, n / 25)``).
    """
    values = np.asarray(losses, dtype=np.float64)
    count = len(values)
    if count < 3:
        return values.copy()
    sigma = width if width is not None else max(1.0, count / 25)
    positions = np.arange(count)
    weights = np.exp(-0.5 * ((positions[:, None] - positions[None, :]) / sigma) ** 2)
    return (weights @ values) / weights.sum(axis=1)


def suggest_learning_rate(lrs: list[float], losses: list[float]) -> tuple[float | None, int | None, str, np.ndarray]:
    """Apply the module doc's rule: ``(suggestion, index, reason, smoothed losses)``."""
    smoothed = smooth_losses(losses)
    count = len(smoothed)
    if count < 10:
        return None, None, f"only {count} steps ran before the loss diverged: lower min_lr", smoothed
    log_lrs = np.log10(np.asarray(lrs, dtype=np.float64))
    slopes = np.gradient(smoothed, log_lrs)
    skip = max(1, count // 20)
    lowest = int(np.argmin(smoothed))
    if np.ptp(smoothed) <= 1e-6 * max(1.0, float(np.abs(smoothed).max())):  # float noise of summation order only
        return None, None, "the loss never changed: do gradients reach the trainable parameters?", smoothed
    if lowest <= skip + 1:
        return None, None, f"the loss rose from the first steps: lower min_lr (now {lrs[0]:.2g})", smoothed
    index = skip + int(np.argmin(slopes[skip : lowest + 1]))
    if slopes[index] >= 0:
        return None, None, "the loss never fell: check the data and the model before the rate", smoothed
    reason = (
        f"steepest descent of the smoothed loss ({smoothed[index]:.4g}, falling {-slopes[index]:.3g} per decade), "
        f"before its minimum {smoothed[lowest]:.4g} at lr {lrs[lowest]:.2g}"
    )
    return float(lrs[index]), index, reason, smoothed


def find_learning_rate(
    trainer: Any,
    *,
    min_lr: float = 1e-7,
    max_lr: float = 1.0,
    num_steps: int = 100,
    divergence: float = 4.0,
    on_step: Callable[[int, float, float], None] | None = None,
) -> LRFindResult:
    """Sweep the learning rate on a set-up trainer and put everything back.

    Args:
        trainer: a :class:`~tightfit.training.trainer.Trainer` after ``setup()``.
        min_lr: the first rate.
        max_lr: the last rate.
        num_steps: optimizer steps of the sweep.
        divergence: stop when the smoothed loss passes this multiple of its minimum.
        on_step: called with ``(step, lr, loss)`` after each step (a progress bar).

    Returns:
        The :class:`LRFindResult`.

    Raises:
        ConfigError: bad sweep settings.
    """
    if not 0 < min_lr < max_lr:
        raise ConfigError(f"lr_find: min_lr ({min_lr}) must be positive and below max_lr ({max_lr})")
    if num_steps < 10:
        raise ConfigError(f"lr_find: num_steps must be at least 10, got {num_steps}")
    saved = _snapshot(trainer)
    lrs: list[float] = []
    losses: list[float] = []
    stopped_early = False
    try:
        trainer.console.quiet = True  # a skipped step's message belongs to training, not to the sweep
        trainer.model.train()
        windows = _endless(trainer.loaders["train"])
        best_smoothed = math.inf
        for step in range(num_steps):
            lr = min_lr * (max_lr / min_lr) ** (step / (num_steps - 1))
            for group in trainer.optimizer.param_groups:
                group["lr"] = lr
            try:
                loss = trainer.train_step(next(windows))["train_loss"]
            except NumericsError:
                loss = math.nan
            if trainer.process.distributed:  # every rank must see the same curve, or they stop at different steps
                loss = _mean_over_ranks(loss, trainer.device)
            if not math.isfinite(loss):
                stopped_early = True
                break
            lrs.append(lr)
            losses.append(loss)
            if on_step is not None:
                on_step(step, lr, loss)
            # the same lag-free smoothing as the suggestion, on what has been seen so far
            current = float(smooth_losses(losses)[-1]) if len(losses) >= 5 else loss
            best_smoothed = min(best_smoothed, current)
            if len(losses) >= 10 and current > divergence * best_smoothed:
                stopped_early = True
                break
    finally:
        _restore(trainer, saved)
    suggestion, index, reason, smoothed = (
        suggest_learning_rate(lrs, losses) if losses else (None, None, "no step ran", np.array([]))
    )
    return LRFindResult(
        lrs=lrs,
        losses=losses,
        smoothed=[float(value) for value in smoothed],
        suggestion=suggestion,
        reason=reason,
        stopped_early=stopped_early,
        min_lr=min_lr,
        max_lr=max_lr,
        num_steps=num_steps,
        suggestion_index=index,
    )


@contextlib.contextmanager
def sweep_progress(total: int, enabled: bool = True):
    """A transient rich progress bar for a sweep; yields the ``on_step`` callable to pass on.

    It draws on a console of its own: the trainer's console is silenced during the sweep.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("[bold]lr-find"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("lr {task.fields[lr]}  loss {task.fields[loss]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(highlight=False), disable=not enabled, transient=True) as progress:
        task = progress.add_task("sweep", total=total, lr="-", loss="-")
        yield lambda step, lr, loss: progress.update(task, completed=step + 1, lr=f"{lr:.2e}", loss=f"{loss:.4f}")


def _mean_over_ranks(loss: float, device: torch.device) -> float:
    total = torch.tensor([loss], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return float(total) / torch.distributed.get_world_size()


def _endless(loader: Any):
    while True:
        yield from loader


def _snapshot(trainer: Any) -> dict[str, Any]:
    return {
        # what a step can change: the trainable parameters and the buffers (BatchNorm statistics);
        # a frozen base (LoRA, QLoRA) is left alone, so the copy costs the adapters, not the model
        "parameters": {
            name: parameter.detach().to("cpu", copy=True)
            for name, parameter in trainer.model.named_parameters()
            if parameter.requires_grad
        },
        "buffers": {name: buffer.detach().to("cpu", copy=True) for name, buffer in trainer.model.named_buffers()},
        "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
        "schedule": copy.deepcopy(trainer.schedule.state_dict()),
        "scaler": copy.deepcopy(trainer.scaler.state_dict()) if trainer.scaler is not None else None,
        "guard": copy.deepcopy(trainer.guard),
        "counters": {name: getattr(trainer, name) for name in _COUNTERS},
        "rng": rng_state(),
        "training": trainer.model.training,
        "quiet": trainer.console.quiet,
    }


def _restore(trainer: Any, saved: dict[str, Any]) -> None:
    with torch.no_grad():
        for name, parameter in trainer.model.named_parameters():
            if name in saved["parameters"]:
                parameter.copy_(saved["parameters"][name])
        for name, buffer in trainer.model.named_buffers():
            buffer.copy_(saved["buffers"][name])
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.optimizer.load_state_dict(saved["optimizer"])
    trainer.schedule.load_state_dict(saved["schedule"])
    if saved["scaler"] is not None:
        trainer.scaler.load_state_dict(saved["scaler"])
    trainer.guard = saved["guard"]
    for name, value in saved["counters"].items():
        setattr(trainer, name, value)
    set_rng_state(saved["rng"])
    trainer.model.train(saved["training"])
    trainer.console.quiet = saved["quiet"]


def plot_lr_find(result: LRFindResult, output: Any) -> Any:
    """Draw the raw and smoothed loss against the rate (log axis) and mark the suggestion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4))
    axis.plot(result.lrs, result.losses, color="0.75", linewidth=1, label="loss")
    axis.plot(result.lrs, result.smoothed, color="C0", linewidth=2, label="smoothed")
    if result.suggestion is not None and result.suggestion_index is not None:
        axis.plot(
            [result.suggestion],
            [result.smoothed[result.suggestion_index]],
            "o",
            color="C3",
            markersize=8,
            label=f"suggestion {result.suggestion:.2g}",
        )
    axis.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="learning-rate range test")
    if result.smoothed:
        low = min(result.smoothed)
        axis.set_ylim(low - 0.05 * abs(low), max(result.smoothed[0], low) * 1.5 + 1e-12)
    axis.legend()
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output
