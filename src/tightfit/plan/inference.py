"""Peak memory of a forward-only pass (feature extraction, prediction): estimated or measured.

The same tracker and the same fake-tensor machinery as the training estimate
(:mod:`tightfit.memory.estimator`, :mod:`tightfit.memory.counted_step`), on a different step::

    model.eval()
    with torch.inference_mode(), autocast(precision):
        output = model(*inputs)                 # no target, no loss, no backward
    del output

Under ``inference_mode`` autograd saves nothing, so each layer's input is freed as soon as the
next layer has consumed it: the peak is the parameters plus the largest few activations alive at
once, not the sum over layers that a training step keeps for backward. There are no gradients
and no optimizer state; the breakdown holds ``parameters``, ``activations`` and the device's
``overhead`` only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from tightfit.errors import ConfigError, TightfitError
from tightfit.hardware.detect import resolve_device
from tightfit.memory.counted_step import _flop_counter
from tightfit.memory.estimator import EstimationError, _fake_weights, _tracing_failure
from tightfit.memory.overhead import allocation_size, device_overhead
from tightfit.memory.report import StepMemory
from tightfit.memory.tracker import MemoryTracker
from tightfit.names import INFERENCE_PRECISIONS
from tightfit.step.loss import split_batch
from tightfit.step.precision import autocast
from tightfit.units import format_bytes

DEFAULT_MAX_BATCH_SIZE = 4096


def forward_inputs(batch: Any) -> tuple[tuple, dict]:
    """The model inputs of a batch without its target or labels (a forward pass needs neither)."""
    args, kwargs, _ = split_batch(batch)
    kwargs = {key: value for key, value in kwargs.items() if key not in ("labels", "target")}
    return args, kwargs


def forward_pass(
    model: nn.Module, make_batch: Callable[[], Any], *, precision: str, device_type: str, count_flops: bool = False
) -> int | None:
    """Run the forward-only step of the module doc; returns its FLOPs when ``count_flops``."""
    import contextlib

    args, kwargs = forward_inputs(make_batch())
    counter = _flop_counter() if count_flops else None
    with counter if counter is not None else contextlib.nullcontext():
        with torch.inference_mode(), autocast(precision, device_type):
            output = model(*args, **kwargs)
    del output, args, kwargs
    return counter.get_total_flops() if counter is not None else None


def _check(batch_size: int, precision: str) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size: must be a positive integer, got {batch_size!r}")
    if precision not in INFERENCE_PRECISIONS:
        raise ConfigError(f"precision: {precision!r} is not an inference precision ({', '.join(INFERENCE_PRECISIONS)})")


def estimate_forward(
    model: nn.Module,
    batch_factory: Callable[[int, Any], Any],
    *,
    batch_size: int,
    precision: str = "fp32",
    profile: Any = None,
    count_flops: bool = True,
) -> StepMemory:
    """Estimate the peak of one forward-only pass on fake tensors (the model may be on meta).

    Args:
        model: the model (real or meta weights; they are swapped for fake ones and put back).
        batch_factory: ``(batch_size, device) -> batch``; its target is ignored.
        batch_size: samples per pass.
        precision: ``fp32``, ``fp16`` or ``bf16`` (autocast; the weights stay fp32).
        profile: the target ``DeviceProfile`` for the overhead (None: CPU, none).
        count_flops: count the pass's FLOPs.

    Returns:
        A :class:`StepMemory` (``method="estimated"``) whose gradients and optimizer are 0.

    Raises:
        EstimationError: the model cannot run on fake tensors.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    _check(batch_size, precision)
    device_type = getattr(profile, "device_type", "cpu")
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    was_training = model.training
    model.eval()
    try:
        with _fake_weights(model, fake_mode, precision), fake_mode:
            with MemoryTracker(model, allocation_size=allocation_size(device_type)) as tracker:
                flops = forward_pass(
                    model,
                    lambda: batch_factory(batch_size, "cpu"),
                    precision=precision,
                    device_type="cpu",
                    count_flops=count_flops,
                )
    except TightfitError:
        raise
    except Exception as error:  # noqa: BLE001 - tracing arbitrary models fails in many ways
        raise EstimationError(_tracing_failure(error).replace("training step", "forward pass")) from error
    finally:
        model.train(was_training)
    overhead = device_overhead(
        profile, tensor_peak_bytes=tracker.peak_bytes, allocated_peak_bytes=tracker.peak_allocated_bytes
    )
    breakdown = tracker.breakdown
    breakdown["overhead"] = overhead.total_bytes
    notes = [f"forward only (inference mode), batch size {batch_size}, precision {precision}"]
    if overhead.total_bytes:
        notes.append(f"{overhead.describe()} (profile {getattr(profile, 'name', '?')})")
    return StepMemory(
        tracker.peak_bytes + overhead.total_bytes, breakdown, tracker.by_module, flops, "estimated", notes
    )


def measure_forward(
    model: nn.Module,
    batch_factory: Callable[[int, Any], Any],
    *,
    batch_size: int,
    precision: str = "fp32",
    device: Any = None,
    budget_bytes: int | None = None,
) -> StepMemory:
    """Measure the peak of one forward-only pass on real tensors (the model on ``device``).

    Raises:
        torch.OutOfMemoryError: over ``budget_bytes`` (simulated) or the device's memory.
    """
    _check(batch_size, precision)
    device = resolve_device(device)
    was_training = model.training
    model.eval()
    try:
        with MemoryTracker(model, budget_bytes=budget_bytes) as tracker:
            flops = forward_pass(
                model,
                lambda: batch_factory(batch_size, device),
                precision=precision,
                device_type=device.type,
                count_flops=True,
            )
    finally:
        model.train(was_training)
    breakdown = tracker.breakdown
    return StepMemory(
        sum(breakdown.values()),
        breakdown,
        tracker.by_module,
        flops,
        "measured",
        [f"forward only (inference mode), measured on {device} with real tensors"],
    )


def largest_batch(
    model: nn.Module,
    batch_factory: Callable[[int, Any], Any],
    *,
    budget_bytes: int,
    precision: str = "fp32",
    profile: Any = None,
    margin: float = 0.1,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
) -> tuple[int, StepMemory | None]:
    """The largest batch whose estimated forward peak stays under ``budget_bytes * (1 - margin)``.

    The peak only grows with the batch, so a doubling search then a bisection over estimates
    (no memory used) finds it. Returns ``(0, None)`` when not even one sample fits.
    """
    threshold = budget_bytes * (1 - margin)
    cache: dict[int, StepMemory] = {}

    def peak(batch: int) -> StepMemory:
        if batch not in cache:
            cache[batch] = estimate_forward(
                model, batch_factory, batch_size=batch, precision=precision, profile=profile, count_flops=False
            )
        return cache[batch]

    if peak(max_batch_size).peak_bytes <= threshold:  # the common case off the GPU: one estimate settles it
        return max_batch_size, peak(max_batch_size)
    if peak(1).peak_bytes > threshold:
        return 0, None
    low, high = 1, 2
    while high <= max_batch_size and peak(high).peak_bytes <= threshold:
        low, high = high, high * 2
    high = min(high, max_batch_size + 1)
    while high - low > 1:
        middle = (low + high) // 2
        if peak(middle).peak_bytes <= threshold:
            low = middle
        else:
            high = middle
    return low, peak(low)


@dataclass
class InferencePlan:
    """Forward-only feasibility of one model on one device (``tightfit plan --inference``)."""

    model: str
    input: str
    device: str
    precision: str
    batch_size: int
    peak_bytes: int
    budget_bytes: int
    margin: float
    verdict: str
    why: str
    breakdown: dict[str, int]
    parameters: int
    flops_per_sample: int | None
    time_per_sample_s: float | None
    samples: int | None = None
    total_time_s: float | None = None
    largest_batch_size: int | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def fits(self) -> bool:
        return self.verdict != "does not fit"

    def to_dict(self) -> dict:
        return {**asdict(self), "fits": self.fits, "mode": "inference"}


def plan_inference(
    model_spec: str,
    input_spec: str,
    *,
    batch_size: int | None = None,
    precision: str = "fp32",
    profile: Any = None,
    margin: float = 0.1,
    samples: int | None = None,
    model_kwargs: dict | None = None,
    num_classes: int | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
) -> InferencePlan:
    """Plan a forward-only pass: the peak at ``batch_size`` (or the largest batch that fits) and the time.

    Time: FLOPs of the pass / (the profile's peak FLOP/s for the precision x the planner's utilisation).

    Raises:
        SpecError, ConfigError: bad specs or settings.
    """
    from tightfit.hardware.profiles import resolve_target
    from tightfit.models.spec import build_model, make_batch_factory, parse_input_spec
    from tightfit.plan.planner import COMPUTE_DTYPE, UTILISATION

    started = time.perf_counter()
    if not 0 <= margin < 1:
        raise ConfigError(f"margin: must be in [0, 1), got {margin}")
    profile = profile if profile is not None else resolve_target()
    model = build_model(model_spec, meta=True, num_classes=num_classes, **(model_kwargs or {}))
    factory = make_batch_factory(parse_input_spec(input_spec), model)
    budget = profile.usable_bytes
    notes = []
    largest = None
    if batch_size is None:
        largest, _ = largest_batch(
            model,
            factory,
            budget_bytes=budget,
            precision=precision,
            profile=profile,
            margin=margin,
            max_batch_size=max_batch_size,
        )
        batch_size = max(largest, 1)
        notes.append(f"largest batch under {1 - margin:.0%} of {format_bytes(budget)}: {largest}")
    memory = estimate_forward(model, factory, batch_size=batch_size, precision=precision, profile=profile)
    peak = memory.peak_bytes
    if peak > budget:
        verdict, why = "does not fit", f"forward peak {format_bytes(peak)} > usable {format_bytes(budget)}"
    elif peak > budget * (1 - margin):
        verdict, why = (
            "tight",
            f"forward peak {format_bytes(peak)} leaves less than {margin:.0%} of {format_bytes(budget)} free",
        )
    else:
        verdict, why = (
            "fits",
            f"forward peak {format_bytes(peak)} of usable {format_bytes(budget)} at batch {batch_size}",
        )
    flops_per_sample = memory.flops // batch_size if memory.flops else None
    rate = profile.flops_for(COMPUTE_DTYPE[precision]) * UTILISATION[profile.device_type]
    per_sample = flops_per_sample / rate if flops_per_sample and rate else None
    parameters = sum(parameter.numel() for parameter in model.parameters())
    notes += memory.notes
    return InferencePlan(
        model=model_spec,
        input=input_spec,
        device=profile.name,
        precision=precision,
        batch_size=batch_size,
        peak_bytes=peak,
        budget_bytes=budget,
        margin=margin,
        verdict=verdict,
        why=why,
        breakdown=memory.breakdown,
        parameters=parameters,
        flops_per_sample=flops_per_sample,
        time_per_sample_s=per_sample,
        samples=samples,
        total_time_s=per_sample * samples if per_sample and samples else None,
        largest_batch_size=largest,
        notes=notes,
        seconds=round(time.perf_counter() - started, 2),
    )


def inference_precisions(profile: Any) -> list[str]:
    """The forward precisions a device runs: fp32, bf16 where it has bf16, fp16 on GPUs (and MPS)."""
    found = ["fp32"]
    if profile.supports_bf16:
        found.append("bf16")
    if profile.device_type in ("cuda", "mps") and profile.supports_fp16_autocast:
        found.append("fp16")
    return found


def choose_inference_precision(
    model_spec: str, input_spec: str, *, profile: Any, **settings
) -> tuple[InferencePlan, str]:
    """:func:`plan_inference` for each precision the device runs; the fastest per sample that
    fits wins, and a tie (within ``TIME_TIE``) goes to the safer one (fp32, then bf16, then fp16),
    as the training planner breaks its ties. Returns ``(plan, reason)``."""
    from tightfit.plan.planner import PRECISION_SAFETY, TIME_TIE

    plans = [
        plan_inference(model_spec, input_spec, precision=name, profile=profile, **settings)
        for name in inference_precisions(profile)
    ]
    fitting = [plan for plan in plans if plan.fits and plan.time_per_sample_s] or [plan for plan in plans if plan.fits]
    if not fitting:
        return min(plans, key=lambda plan: plan.peak_bytes), "none fits: the smallest peak"
    fastest = min(plan.time_per_sample_s or math.inf for plan in fitting)
    tied = [plan for plan in fitting if (plan.time_per_sample_s or math.inf) <= fastest * (1 + TIME_TIE)]
    best = min(tied, key=lambda plan: PRECISION_SAFETY[plan.precision])
    others = ", ".join(
        f"{plan.precision} {plan.time_per_sample_s / best.time_per_sample_s:.2f}x"
        for plan in plans
        if plan is not best and plan.time_per_sample_s and best.time_per_sample_s
    )
    reason = (
        "fastest per sample"
        + (", ties to the safer" if len(tied) > 1 else "")
        + (f" (time per sample: {others})" if others else "")
    )
    return best, reason


def forward_time_per_sample(
    model: nn.Module,
    batch_factory: Callable[[int, Any], Any],
    *,
    batch_size: int,
    precision: str,
    device: torch.device,
    batches: int = 3,
) -> float:
    """Seconds per sample of a real forward pass on this machine (median of ``batches`` after a warm-up)."""
    timings = []
    was_training = model.training
    model.eval()
    try:
        for index in range(batches + 1):
            batch = batch_factory(batch_size, device)
            started = time.perf_counter()
            forward_pass(model, lambda batch=batch: batch, precision=precision, device_type=device.type)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if index:
                timings.append(time.perf_counter() - started)
    finally:
        model.train(was_training)
    timings.sort()
    return timings[len(timings) // 2] / batch_size if timings else math.nan


@dataclass
class InferenceBatchSearch:
    """The largest forward-only batch under a budget: predicted on fake tensors, confirmed on real ones."""

    batch_size: int
    predicted_batch_size: int
    peak_bytes: int | None
    budget_bytes: int
    trials: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**asdict(self), "mode": "inference"}


def find_inference_batch_size(
    model: nn.Module,
    batch_factory: Callable[[int, Any], Any],
    *,
    budget_bytes: int,
    device: Any = None,
    precision: str = "fp32",
    margin: float = 0.1,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
) -> InferenceBatchSearch:
    """``tightfit batch-size --inference``: predict the largest batch, then confirm it with real passes.

    Each real pass runs under the budget less the margin (simulated by the tracker on CPU); a pass
    that does not fit halves the interval, as the training search does.
    """
    device = resolve_device(device)
    limit = int(budget_bytes * (1 - margin))
    predicted, _ = largest_batch(
        model,
        batch_factory,
        budget_bytes=budget_bytes,
        precision=precision,
        margin=margin,
        max_batch_size=max_batch_size,
    )
    trials: list[dict] = []

    def fits(batch: int) -> int | None:
        started = time.perf_counter()
        try:
            memory = measure_forward(
                model, batch_factory, batch_size=batch, precision=precision, device=device, budget_bytes=limit
            )
        except torch.OutOfMemoryError:
            trials.append(
                {"batch_size": batch, "fits": False, "peak_bytes": None, "seconds": time.perf_counter() - started}
            )
            return None
        trials.append(
            {
                "batch_size": batch,
                "fits": True,
                "peak_bytes": memory.peak_bytes,
                "seconds": time.perf_counter() - started,
            }
        )
        return memory.peak_bytes

    low, high = 0, predicted + 1
    if predicted and fits(predicted) is not None:
        low = predicted
        if predicted < max_batch_size and fits(predicted + 1) is not None:  # the estimate was low: search upwards
            low, high = predicted + 1, max_batch_size + 1
            step = max(1, predicted)
            while low + step < high and fits(low + step) is not None:
                low, step = low + step, step * 2
            high = min(high, low + step)
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle) is not None:
            low = middle
        else:
            high = middle
    peak = next(
        (trial["peak_bytes"] for trial in reversed(trials) if trial["batch_size"] == low and trial["fits"]), None
    )
    return InferenceBatchSearch(low, predicted, peak, budget_bytes, trials)
