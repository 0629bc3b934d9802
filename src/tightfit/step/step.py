"""The training step: the one piece of code that runs forward, backward and the optimizer.

The trainer, the memory estimator (on fake tensors), the memory measurement, the batch-size
search, out-of-memory recovery, ``plan --measure`` and the doctor's smoke test all call
:class:`TrainingStep`; nothing else in tightfit calls ``.backward()``. So what ``plan`` and
``batch-size`` predict is, structurally, the step that ``train`` runs.

One step over a *window* (the effective batch: the samples of one optimizer step)::

    for each micro-batch of the window:                  # micro_batch_size samples
        batch = transfer(micro-batch)                    # to the device; bf16-pure: floats in bf16
        with sync_context(last micro-batch?):            # FSDP: reduce-scatter on the last; ddp: average after it
            with autocast(precision):
                output, loss = forward_and_loss(model, batch)
            backward(scale(loss * samples / window samples))
    unscale the gradients (fp16 with a GradScaler)
    grad_norm = clip_grad_norm_(max) or the total norm   # what the numerics guard reads
    if not skip_check(mean loss, grad_norm): optimizer.step()  # through the GradScaler if there is one
    scaler.update(); optimizer.zero_grad(set_to_none=True)

Each micro-batch's mean loss is weighted by its share of the window, so the summed gradient is
the gradient of the window's mean loss: one large batch, exactly, also for a short last window.

The step never turns a tensor into a Python number: it runs on fake tensors too. Whatever needs
numbers (the numerics guard, logging) reads :class:`StepResult` afterwards, or decides in the
``skip_check`` hook, which only the trainer passes.
"""

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tightfit.step.batch import cast_floats, count_samples, move_to_device, slice_batch
from tightfit.step.loss import forward_and_loss
from tightfit.step.precision import autocast

SyncContext = Callable[[bool], AbstractContextManager]
SkipCheck = Callable[[torch.Tensor, torch.Tensor], "str | None"]


@dataclass
class StepResult:
    """What one step did; tensors, so reading them is the caller's choice (and sync point).

    Attributes:
        loss: the window's mean loss (over its samples), fp32.
        grad_norm: the total gradient norm before clipping (after unscaling), fp32.
        samples: the samples in the window.
        skipped: why the optimizer step was skipped (``skip_check``'s answer), else None.
    """

    loss: torch.Tensor
    grad_norm: torch.Tensor
    samples: int
    skipped: str | None = None


class TrainingStep:
    """One optimizer step over a window of samples, in micro-batches (see the module docstring).

    Args:
        model: the model to call (the DDP/FSDP wrapper when there is one).
        optimizer: its optimizer.
        device: where micro-batches are moved before the forward pass.
        precision: a name from :data:`tightfit.step.precision.PRECISIONS`.
        micro_batch_size: samples per forward/backward; out-of-memory recovery lowers it.
        scaler: a ``torch.amp.GradScaler`` (fp16 on CUDA/MPS), else None.
        clip_grad_norm: clip the total gradient norm to this, when set.
        sync_context: ``(last_micro_batch) -> context`` around each micro-batch's forward and
            backward (``training.distributed.gradient_sync_context``, and the trainer's agreement
            on out-of-memory and gradient average for ``ddp`` after the last).
        skip_check: ``(mean_loss, grad_norm) -> reason | None``, asked before ``optimizer.step``;
            a reason skips the update (the numerics guard). None: never skip.
        transfer: ``(micro_batch) -> micro_batch on the device``; default: ``move_to_device``.
            The memory estimator, on CPU fake tensors for a GPU target, passes a copy instead so
            the device copy of each micro-batch is counted as the GPU would hold it.
        foreach: the gradient-norm kernels (None: torch's default for the tensors' device). The
            estimator passes True for a CUDA target, whose default it is, on its CPU fake tensors.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        micro_batch_size: int,
        scaler: Any = None,
        clip_grad_norm: float | None = None,
        sync_context: SyncContext | None = None,
        skip_check: SkipCheck | None = None,
        transfer: Callable[[Any], Any] | None = None,
        foreach: bool | None = None,
    ):
        self.model = model
        self.optimizer = optimizer
        self.device = torch.device(device)
        self.precision = precision
        self.micro_batch_size = micro_batch_size
        self.scaler = scaler
        self.clip_grad_norm = clip_grad_norm
        self.sync_context = sync_context
        self.skip_check = skip_check
        self.transfer = transfer or (lambda batch: move_to_device(batch, self.device, non_blocking=True))
        self.foreach = foreach
        self._parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]

    def __call__(self, window: Any, *, flop_counter: AbstractContextManager | None = None) -> StepResult:
        """Run the step on ``window``; ``flop_counter`` (a context) wraps the first micro-batch."""
        samples = count_samples(window)
        loss_sum = self.accumulate_gradients(window, samples, flop_counter)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip and check the true gradients, not the scaled ones
        grad_norm = self._gradient_norm()
        loss = loss_sum / samples
        skipped = self.skip_check(loss, grad_norm) if self.skip_check is not None else None
        if skipped is None:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()  # also after a skipped step: unscale_ must be followed by update
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=loss, grad_norm=grad_norm, samples=samples, skipped=skipped)

    def accumulate_gradients(
        self, window: Any, samples: int, flop_counter: AbstractContextManager | None = None
    ) -> torch.Tensor:
        """Forward and backward every micro-batch of the window; returns the summed loss."""
        loss_sum = None
        starts = range(0, samples, self.micro_batch_size)
        for index, start in enumerate(starts):
            batch = self.transfer(slice_batch(window, start, start + self.micro_batch_size))
            if self.precision == "bf16-pure":
                batch = cast_floats(batch, torch.bfloat16)
            micro_samples = count_samples(batch)
            counting = flop_counter if index == 0 and flop_counter is not None else contextlib.nullcontext()
            syncing = (
                self.sync_context(index == len(starts) - 1)
                if self.sync_context is not None
                else contextlib.nullcontext()
            )
            with counting, syncing:
                with autocast(self.precision, self.device.type):
                    output, loss = forward_and_loss(self.model, batch)
                del output  # the autograd graph keeps what backward needs
                weighted = loss * (micro_samples / samples)
                (self.scaler.scale(weighted) if self.scaler is not None else weighted).backward()
            contribution = loss.detach().float() * micro_samples
            if loss_sum is None:
                loss_sum = contribution
            else:
                loss_sum.add_(contribution)  # in place: micro-batch k holds what micro-batch 2 holds
            del loss, weighted, contribution
        return loss_sum

    def _gradient_norm(self) -> torch.Tensor:
        """The total gradient norm; clipped to ``clip_grad_norm`` when set (returns the norm before)."""
        if self.clip_grad_norm is not None:
            return torch.nn.utils.clip_grad_norm_(self._parameters, self.clip_grad_norm, foreach=self.foreach)
        gradients = [parameter.grad for parameter in self._parameters if parameter.grad is not None]
        if not gradients:
            return torch.zeros((), device=self.device)
        return torch.nn.utils.get_total_norm(gradients, foreach=self.foreach)
