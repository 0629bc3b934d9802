"""The largest batch size whose training step really runs: predicted first, then confirmed.

Doubling the batch until out-of-memory (seed-000, Lightning's ``power`` mode) or halving on every
out-of-memory (accelerate's ``find_executable_batch_size``) costs many crashing steps and lands
on a batch that barely fits. tightfit asks the estimator first (fake tensors, no memory), runs a
real step at the predicted batch size, corrects the prediction with what it measured, and bisects
only the gap that remains — usually one or two real steps.

The recipe, read top to bottom in :func:`find_batch_size`:

1. ``target = budget * (1 - margin)``: the batch must fit with headroom (Lightning #20231: a batch
   that barely fits crashes later in real training).
2. ``predicted`` = the largest batch whose estimated peak fits ``target``.
3. A real trial step (after a warm-up step) at ``predicted``, under the budget.
4. While the largest fitting and smallest failing batch sizes are more than one apart: the next
   trial is the largest batch the *corrected* estimate (scaled by measured / estimated at the last
   trial) says fits. When a trial confirms the estimate to 0.5 %, the estimate is trusted for the
   batch above it, and no failing trial is needed.
5. Weights, buffers, gradients, train/eval mode and every random generator are put back as they were.
"""

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from tightfit.errors import ConfigError, TightfitError
from tightfit.hardware.detect import resolve_device
from tightfit.memory.bisect import largest_fitting
from tightfit.memory.estimator import EstimationError, estimate_step
from tightfit.memory.measure import measure_step
from tightfit.memory.oom import is_out_of_memory
from tightfit.memory.report import StepMemory
from tightfit.step.rng import rng_state, set_rng_state
from tightfit.units import format_bytes, plural

CONFIRMED_TOLERANCE = 0.005  # a measurement within 0.5 % of the estimate confirms it


@dataclass
class BatchSizeResult:
    """What :func:`find_batch_size` found.

    Attributes:
        batch_size: the largest batch size that ran within ``target_bytes`` (0: not even 1 does).
        peak_bytes: the measured peak of a step at ``batch_size`` (0 when ``batch_size`` is 0).
        predicted_batch_size: the estimator's answer before any real step; None when the model
            could not be traced (the search then doubled from 1).
        seconds: wall time of the whole search, estimates included.
        trials: the real steps made, in order: ``{"batch_size", "fits", "peak_bytes", "seconds"}``;
            ``peak_bytes`` is None when the step ran out of memory.
        budget_bytes: the memory budget.
        target_bytes: the budget less the margin: what a batch must fit in.
        notes: how the answer was reached.
    """

    batch_size: int
    peak_bytes: int
    predicted_batch_size: int | None
    seconds: float
    trials: list[dict] = field(default_factory=list)
    budget_bytes: int = 0
    target_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def find_batch_size(
    model: nn.Module,
    batch_factory: Callable[[int, Any], Any],
    *,
    budget_bytes: int | None = None,
    device: Any = None,
    precision: str = "fp32",
    optimizer: str = "adamw",
    checkpointing: bool | str | list[str] = False,
    margin: float = 0.1,
    max_batch_size: int = 4096,
    accumulation_steps: int = 1,
    clip_grad_norm: float | None = None,
) -> BatchSizeResult:
    """Find the largest batch size whose training step runs within a memory budget.

    Args:
        model: the model to train, on ``device``. Its weights, buffers, gradients, mode and the
            random generators are restored afterwards.
        batch_factory: ``(batch_size, device) -> batch``.
        budget_bytes: the memory to fit in. On CPU it is required and enforced by the tracker
            (``torch.OutOfMemoryError`` above it); on CUDA/MPS it defaults to the device's memory
            and the device enforces it.
        device: where the trials run (``None``: CUDA, else MPS, else CPU).
        precision, optimizer, accumulation_steps, clip_grad_norm: the training settings of the
            step, as the run will use them (the trainer's ``micro_batch_size: auto`` passes its own).
        checkpointing: False, True/"auto" or module names; applied to ``model`` in place, as
            training will use it.
        margin: the fraction of the budget kept free (default 10 %).
        max_batch_size: the largest batch size considered.

    Returns:
        A :class:`BatchSizeResult`.

    Raises:
        ConfigError: a missing budget on CPU, a margin outside [0, 1), a non-positive maximum.
        torch.OutOfMemoryError and other errors of the step itself that are not out-of-memory.
    """
    started = time.perf_counter()
    device = resolve_device(device)
    if not 0 <= margin < 1:
        raise ConfigError(f"margin: must be in [0, 1), got {margin!r}")
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ConfigError(f"max_batch_size: must be a positive integer, got {max_batch_size!r}")
    budget_bytes = _budget(budget_bytes, device)
    target_bytes = int(budget_bytes * (1 - margin))
    notes: list[str] = []
    if checkpointing:
        from tightfit.models.checkpointing import apply_activation_checkpointing

        # This also turns off a transformers model's key/value cache, as checkpointed training needs.
        blocks = apply_activation_checkpointing(model, "auto" if checkpointing is True else checkpointing)
        notes.append(f"activation checkpointing applied to {len(blocks)} blocks of the model, in place")

    snapshot = _ModelSnapshot(model)
    random_state = rng_state()
    settings = dict(
        precision=precision, optimizer=optimizer, accumulation_steps=accumulation_steps, clip_grad_norm=clip_grad_norm
    )
    try:
        estimate = _Estimates(model, batch_factory, settings, profile=_profile_for(device))
        trial = _Trials(model, batch_factory, settings, device, budget_bytes, target_bytes, snapshot)
        predicted = estimate.largest_fitting(target_bytes, max_batch_size)
        if predicted is None:
            notes.append(f"estimates unavailable ({estimate.failure}); doubling from 2")
            fits_at, fails_at = _double(trial, max_batch_size)
        else:
            notes.append(
                f"estimator predicted {predicted} ({sum(v is not None for v in estimate.cache.values())} estimates)"
            )
            fits_at, fails_at = _confirm(trial, estimate, max(predicted, 1), target_bytes, max_batch_size)
    finally:
        snapshot.restore()
        set_rng_state(random_state)
    peak_bytes = next((t["peak_bytes"] for t in trial.log if t["batch_size"] == fits_at and t["fits"]), 0)
    if fails_at == fits_at + 1 and not any(t["batch_size"] == fails_at for t in trial.log):
        notes.append(f"batch {fails_at} ruled out by the estimate, confirmed by the measurement at {fits_at}")
    return BatchSizeResult(
        batch_size=fits_at,
        peak_bytes=peak_bytes,
        predicted_batch_size=predicted,
        seconds=time.perf_counter() - started,
        trials=trial.log,
        budget_bytes=budget_bytes,
        target_bytes=target_bytes,
        notes=notes,
    )


def micro_batch_dividing(effective_batch_size: int, fits: int) -> int:
    """The micro-batch ``micro_batch_size: auto`` takes for an effective batch, given the largest that fits.

    The largest divisor of ``effective_batch_size`` up to ``fits``, so every accumulation window
    is made of equal micro-batches; when that divisor is under half of ``fits`` (an effective
    batch of 61 has only 1 and 61), ``fits`` itself, and the window's last micro-batch is smaller.

    >>> micro_batch_dividing(64, 629), micro_batch_dividing(64, 40), micro_batch_dividing(61, 40)
    (64, 32, 40)
    """
    fits = max(1, min(fits, effective_batch_size))
    divisor = next(size for size in range(fits, 0, -1) if effective_batch_size % size == 0)
    return divisor if 2 * divisor >= fits else fits


def _confirm(trial, estimate, predicted: int, target_bytes: int, max_batch_size: int) -> tuple[int, int]:
    """Real trials from the prediction until the largest fitting batch size is known."""
    fits_at, fails_at = 0, max_batch_size + 1
    correction = None  # measured / estimated peak at the last trial that completed
    candidate = min(predicted, max_batch_size)
    while True:
        fits, peak_bytes = trial(candidate)
        if fits:
            fits_at = candidate
        else:
            fails_at = candidate
        if peak_bytes is not None and estimate.peak(candidate):
            correction = peak_bytes / estimate.peak(candidate)
        if fits and correction is not None and abs(correction - 1) <= CONFIRMED_TOLERANCE and fits_at + 1 < fails_at:
            above = estimate.peak(fits_at + 1)
            if above is not None and above * correction > target_bytes:
                fails_at = fits_at + 1  # the estimate is confirmed here; trust it one step up
        if fails_at - fits_at <= 1:
            return fits_at, fails_at
        if correction is None:  # out of memory with nothing measured yet: bisect
            candidate = (fits_at + fails_at) // 2
            continue
        corrected = estimate.largest_fitting(target_bytes / correction, fails_at - 1, lowest=fits_at + 1)
        candidate = corrected if corrected is not None and corrected > fits_at else fits_at + 1


def _double(trial, max_batch_size: int) -> tuple[int, int]:
    """Without estimates: double until a trial fails, then bisect (Lightning's power+binsearch).

    Doubling starts at 2 (batch norm refuses one sample in training); 1 is tried only when 2 fails.
    """
    fits_at, fails_at, candidate = 0, max_batch_size + 1, min(2, max_batch_size)
    while candidate < fails_at:
        fits, _ = trial(candidate)
        if not fits:
            fails_at = candidate
            break
        fits_at = candidate
        candidate = min(candidate * 2, max_batch_size + 1) if candidate < max_batch_size else fails_at
    while fails_at - fits_at > 1:
        middle = (fits_at + fails_at) // 2
        fits, _ = trial(middle)
        fits_at, fails_at = (middle, fails_at) if fits else (fits_at, middle)
    return fits_at, fails_at


class _Estimates:
    """Estimated peaks by batch size, cached; the search over them for the largest that fits."""

    def __init__(self, model, batch_factory, settings: dict, profile):
        self.model, self.batch_factory, self.settings, self.profile = model, batch_factory, settings, profile
        self.cache: dict[int, StepMemory | None] = {}
        self.failure: str | None = None  # why the last estimate that failed did

    def memory(self, batch_size: int) -> StepMemory | None:
        """The estimate at ``batch_size``; None when the step cannot be traced there."""
        if batch_size not in self.cache:
            try:
                self.cache[batch_size] = estimate_step(
                    self.model,
                    self.batch_factory,
                    batch_size=batch_size,
                    profile=self.profile,
                    count_flops=False,
                    **self.settings,
                )
            except EstimationError as error:
                self.failure = str(error)
                self.cache[batch_size] = None
        return self.cache[batch_size]

    def peak(self, batch_size: int) -> int | None:
        """The estimated peak at ``batch_size``; None when the step cannot be traced there."""
        memory = self.memory(batch_size)
        return memory.peak_bytes if memory is not None else None

    def largest_fitting(self, target_bytes: float, highest: int, lowest: int = 1) -> int | None:
        """The largest batch in [lowest, highest] whose estimate fits; lowest - 1 if none; None if no estimates.

        Batch norm refuses a batch of one sample in training: when batch 1 cannot be estimated,
        the search starts at two.
        """
        answer = largest_fitting(self.memory, target_bytes, highest=highest, lowest=lowest)
        if answer is None and lowest == 1 and highest >= 2 and self.memory(2) is not None:
            answer = largest_fitting(self.memory, target_bytes, highest=highest, lowest=2)
        return answer


class _Trials:
    """Real trial steps at chosen batch sizes; each one restores the weights before it runs."""

    def __init__(self, model, batch_factory, settings, device, budget_bytes, target_bytes, snapshot):
        self.model, self.batch_factory, self.settings = model, batch_factory, settings
        self.device, self.budget_bytes, self.target_bytes, self.snapshot = device, budget_bytes, target_bytes, snapshot
        self.log: list[dict] = []

    def __call__(self, batch_size: int) -> tuple[bool, int | None]:
        self.snapshot.restore()
        if self.settings["precision"] == "bf16-pure":
            self.model.to(torch.bfloat16)
        started = time.perf_counter()
        simulated = self.device.type == "cpu"
        try:
            memory = measure_step(
                self.model,
                self.batch_factory,
                batch_size=batch_size,
                device=self.device,
                budget_bytes=self.budget_bytes if simulated else None,
                **self.settings,
            )
            peak_bytes = memory.peak_bytes
        except Exception as error:  # noqa: BLE001 - only out-of-memory is an answer; the rest re-raises
            if not is_out_of_memory(error):
                raise
            peak_bytes = None
        finally:
            for parameter in self.model.parameters():
                parameter.grad = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        fits = peak_bytes is not None and peak_bytes <= self.target_bytes
        self.log.append(
            {"batch_size": batch_size, "fits": fits, "peak_bytes": peak_bytes, "seconds": time.perf_counter() - started}
        )
        return fits, peak_bytes


class _ModelSnapshot:
    """The weights, buffers, gradients and mode of a model, to put back after trial steps.

    Copies live on the CPU so a GPU search does not hold a second set of weights on the device.
    Restoring assigns ``.data``, so dtype and values come back exactly and the parameter objects
    (which a user's optimizer refers to) stay the same.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.training = model.training
        self.parameters = [
            (parameter, _copy(parameter.detach()), None if parameter.grad is None else _copy(parameter.grad))
            for parameter in model.parameters()
        ]
        self.buffers = [(module, name, _copy(buffer)) for module, name, buffer in _named_buffers(model)]

    def restore(self) -> None:
        with torch.no_grad():
            for parameter, data, grad in self.parameters:
                parameter.data = data.to(parameter.device, copy=True)
                parameter.grad = None if grad is None else grad.to(parameter.device, copy=True)
            for module, name, buffer in self.buffers:
                current = module._buffers[name]
                module._buffers[name] = buffer.to(current.device if current is not None else buffer.device, copy=True)
        self.model.train(self.training)


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True)


def _named_buffers(model: nn.Module):
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                yield module, name, buffer


def _budget(budget_bytes: int | None, device: torch.device) -> int:
    if budget_bytes is not None:
        if not isinstance(budget_bytes, int) or budget_bytes <= 0:
            raise ConfigError(f"budget_bytes: must be a positive number of bytes, got {budget_bytes!r}")
        return budget_bytes
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        return free_bytes + torch.cuda.memory_reserved(device)
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory())
    raise ConfigError("memory budget: on CPU give one (--memory 2GiB); the search simulates it")


def _profile_for(device: torch.device):
    """The profile whose overhead the estimates add: the detected device for CUDA/MPS, none on CPU."""
    if device.type == "cpu":
        return None
    try:
        from tightfit.hardware.profiles import detect_profile

        return detect_profile()
    except (ImportError, TightfitError):
        return None


def describe(result: BatchSizeResult) -> str:
    """One line for people: the batch size, its peak against the budget, the trials it took."""
    if result.batch_size == 0:
        return f"not even batch size 1 fits in {format_bytes(result.target_bytes)} (budget less margin)"
    return (
        f"batch size {result.batch_size}: peak {format_bytes(result.peak_bytes)} of "
        f"{format_bytes(result.target_bytes)} allowed ({format_bytes(result.budget_bytes)} less the margin), "
        f"{plural(len(result.trials), 'trial step')}, {result.seconds:.1f} s"
    )
