"""Peak memory of a training step, measured on real tensors with the same counter as an estimate.

:func:`measure_step` builds (or takes) the model, runs one warm-up step so the optimizer state
exists, then counts the next step with :class:`~tightfit.memory.tracker.MemoryTracker` — the
trainer's own step, run by :func:`~tightfit.memory.counted_step.counted_step`, as the estimator
runs it on fake tensors. On CPU a ``budget_bytes`` is enforced by the tracker
(``torch.OutOfMemoryError`` above it), so every out-of-memory path is testable without a GPU.
"""

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tightfit.hardware.detect import resolve_device
from tightfit.memory.counted_step import BatchFactory, StepSettings, apply_checkpointing, counted_step, make_step
from tightfit.memory.report import StepMemory
from tightfit.models.checkpointing import disable_kv_cache
from tightfit.step.optim import build_optimizer
from tightfit.units import format_bytes


def measure_step(
    model: nn.Module | Callable[[], nn.Module],
    batch_factory: BatchFactory,
    *,
    batch_size: int,
    precision: str = "fp32",
    optimizer: str = "adamw",
    checkpointing: bool | str | list[str] = False,
    accumulation_steps: int = 1,
    clip_grad_norm: float | None = None,
    device: Any = None,
    budget_bytes: int | None = None,
) -> StepMemory:
    """Measure the peak memory of one steady-state training step on real tensors.

    Args:
        model: an ``nn.Module`` (moved to ``device``, cast for ``bf16-pure``; its weights change:
            two optimizer steps run) or a factory ``() -> nn.Module``.
        batch_factory, batch_size, precision, optimizer, checkpointing, accumulation_steps,
            clip_grad_norm: as for :func:`tightfit.memory.estimator.estimate_step`.
        device: where to run (``None``: CUDA, else MPS, else CPU).
        budget_bytes: a simulated memory budget: ``torch.OutOfMemoryError`` when live tensor
            bytes would exceed it (both steps run under it).

    Returns:
        A :class:`StepMemory` with ``method="measured"``. On CUDA, ``overhead`` is what the
        caching allocator reserved beyond the tensors (``max_memory_reserved`` minus the tensor
        peak); the notes give ``max_memory_allocated`` and ``max_memory_reserved``.

    Raises:
        torch.OutOfMemoryError: the step does not fit (the budget, or the device itself).
        ConfigError: invalid settings.
    """
    settings = StepSettings(batch_size, precision, optimizer, accumulation_steps, clip_grad_norm)
    device = resolve_device(device)
    if not isinstance(model, nn.Module):
        model = model()
    if precision == "bf16-pure":
        model = model.to(torch.bfloat16)
    model = model.to(device)
    blocks = apply_checkpointing(model, checkpointing)
    model.train()
    disable_kv_cache(model)
    step = make_step(model, build_optimizer(optimizer, model.parameters()), settings, device)
    window = batch_factory(settings.window_size, "cpu")  # host data, as the trainer's loader gives it
    counted_step(step, window, budget_bytes=budget_bytes)  # warm-up: kernels, optimizer state
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    tracker, flops = counted_step(step, window, budget_bytes=budget_bytes, count_flops=True)
    breakdown = tracker.breakdown
    notes = settings.notes(blocks)
    notes.append(f"measured on {device} with real tensors after one warm-up step")
    if budget_bytes is not None:
        notes.append(f"under a simulated budget of {format_bytes(budget_bytes)}")
    if device.type == "cuda":
        allocated = torch.cuda.max_memory_allocated(device)
        reserved = torch.cuda.max_memory_reserved(device)
        breakdown["overhead"] = max(0, reserved - tracker.peak_bytes)
        notes.append(
            f"torch.cuda.max_memory_allocated {allocated} B, max_memory_reserved {reserved} B "
            "(the CUDA context is outside both)"
        )
    return StepMemory(
        peak_bytes=sum(breakdown.values()),
        breakdown=breakdown,
        by_module=tracker.by_module,
        flops=flops,
        method="measured",
        notes=notes,
        **tracker.moments(),
    )
