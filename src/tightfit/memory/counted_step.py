"""The training step under the memory tracker: what an estimate and a measurement both run.

:func:`counted_step` runs one :class:`~tightfit.step.step.TrainingStep` — the trainer's step —
inside a :class:`~tightfit.memory.tracker.MemoryTracker`. The estimator calls it on fake tensors,
the measurement on real ones; only the tensors differ.

The window (the samples of one optimizer step) is made *before* the tracker starts, as the
trainer's data loader makes it before its step, and is the tracker's ``host_data``: host-side
data is not part of the peak (not even when the step slices micro-batches out of it). What the
step copies to the device (each micro-batch, on CUDA/MPS) is. With accumulation, micro-batches
2..k all hold the gradients of the earlier ones, so a window of two micro-batches already reaches
the peak of a window of k: only two are run.
"""

import contextlib
import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tightfit.errors import ConfigError
from tightfit.memory.tracker import MemoryTracker
from tightfit.models.checkpointing import apply_activation_checkpointing
from tightfit.step.precision import PRECISIONS, needs_grad_scaler
from tightfit.step.step import TrainingStep

BatchFactory = Callable[[int, Any], Any]


@dataclass(frozen=True)
class StepSettings:
    """The settings of a training step that change its memory: the same names as the config.

    Attributes:
        batch_size: the micro-batch size.
        precision: a name from ``PRECISIONS``.
        optimizer: a name from ``tightfit.step.optim.OPTIMIZERS``.
        accumulation_steps: micro-batches per optimizer step.
        clip_grad_norm: the trainer's gradient clipping, when set (its norm temporaries count).
    """

    batch_size: int
    precision: str = "fp32"
    optimizer: str = "adamw"
    accumulation_steps: int = 1
    clip_grad_norm: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size: must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.accumulation_steps, int) or self.accumulation_steps < 1:
            raise ConfigError(f"accumulation_steps: must be a positive integer, got {self.accumulation_steps!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision: unknown value {self.precision!r} (choose from {', '.join(PRECISIONS)})")

    @property
    def window_size(self) -> int:
        """Samples in the window the engine runs: two micro-batches reach the peak of k (see above)."""
        return self.batch_size * min(self.accumulation_steps, 2)

    def notes(self, blocks: list[str]) -> list[str]:
        notes = [f"batch size {self.batch_size}, precision {self.precision}, optimizer {self.optimizer}"]
        if self.accumulation_steps > 1:
            notes.append(f"gradient accumulation over {self.accumulation_steps} micro-batches: gradients stay live")
        if self.clip_grad_norm is not None:
            notes.append(f"gradients clipped to norm {self.clip_grad_norm}")
        if blocks:
            notes.append(f"activation checkpointing on {len(blocks)} blocks ({blocks[0]}, ...)")
        return notes


def apply_checkpointing(model: nn.Module, checkpointing: bool | str | list[str]) -> list[str]:
    """Apply activation checkpointing in place (False: none, True: "auto"); the block names."""
    if not checkpointing:
        return []
    return apply_activation_checkpointing(model, "auto" if checkpointing is True else checkpointing)


def make_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    settings: StepSettings,
    device: torch.device,
    *,
    transfer: Callable[[Any], Any] | None = None,
    foreach: bool | None = None,
) -> TrainingStep:
    """The trainer's step with these settings (a GradScaler where the trainer would use one)."""
    scaler = torch.amp.GradScaler(device.type) if needs_grad_scaler(settings.precision, device.type) else None
    return TrainingStep(
        model,
        optimizer,
        device=device,
        precision=settings.precision,
        micro_batch_size=settings.batch_size,
        scaler=scaler,
        clip_grad_norm=settings.clip_grad_norm,
        transfer=transfer,
        foreach=foreach,
    )


def counted_step(
    step: TrainingStep,
    window: Any,
    *,
    budget_bytes: int | None = None,
    allocation_size=None,
    count_flops: bool = False,
) -> tuple[MemoryTracker, int | None]:
    """Run ``step`` on ``window`` counted by a tracker (the window itself is host data: not
    counted); the tracker and, when asked, the FLOPs of one micro-batch."""
    tracker = MemoryTracker(
        step.model, step.optimizer, budget_bytes=budget_bytes, allocation_size=allocation_size, host_data=window
    )
    counter = _flop_counter() if count_flops else None
    with _cyclic_gc_paused(collect_first=step.device.type != "cpu"), tracker:
        step(window, flop_counter=counter)
    return tracker, counter.get_total_flops() if counter is not None else None


@contextlib.contextmanager
def _cyclic_gc_paused(collect_first: bool) -> Iterator[None]:
    """Keep Python's cycle collector off until the step ends (after collecting, on devices).

    Some models and ``torch.utils.checkpoint`` leave tensors in reference cycles; when the
    collector happens to run decides when they are freed, and so the peak. Paused, the peak is
    reproducible (estimate and measurement agree) and an upper bound: cyclic garbage counts until
    the step ends. Garbage from before the step is not counted by the tracker, so a collection
    first (0.3 s or more with transformers loaded) is only worth it where it frees device memory.
    """
    if collect_first:
        gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class _NoModuleTracker:
    """Stands in for ``FlopCounterMode``'s ``ModuleTracker``: every FLOP goes to "Global" only."""

    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


def _flop_counter():
    """A ``FlopCounterMode`` that counts the total only, without tracking modules.

    Its ``ModuleTracker`` would change the lifetimes being measured: it registers a multi-grad
    hook on the inputs and outputs of every module call, whose closure keeps a list of those
    tensors' ``grad_fn`` nodes, which hold the hook: a reference cycle. For the graph built
    while a checkpointed block is recomputed in backward, whose nodes never run and so never
    release their saved tensors, the cycle keeps every recomputed activation alive until the
    cycle collector runs (paused during the step), so checkpointing appeared not to lower the peak.
    The total is the same: ``"Global"`` is always among the tracked parents.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    if hasattr(counter, "mod_tracker"):
        counter.mod_tracker = _NoModuleTracker()
    return counter
