"""Peak memory of a training step, estimated on fake tensors: no weights, no memory, any device.

The estimate runs the trainer's own step (:class:`~tightfit.step.step.TrainingStep`, through
:func:`~tightfit.memory.counted_step.counted_step`) under ``FakeTensorMode``: every tensor has its
shape, dtype and storage size but no memory, so a 7B decoder is planned on a laptop in seconds,
and on CPU the estimate and a measurement (:mod:`tightfit.memory.measure`) agree to the byte
wherever the kernels allocate the same outputs.

Peak = the largest total of live storage bytes over one steady-state step (the optimizer state
exists, as after a warm-up step), plus what the target device adds on top
(:mod:`tightfit.memory.overhead`). For a CUDA target the optimizer and the gradient norm run the
multi-tensor (foreach) kernels torch picks there, and each micro-batch is copied to the device.
"""

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from tightfit.errors import TightfitError
from tightfit.memory.counted_step import BatchFactory, StepSettings, apply_checkpointing, counted_step, make_step
from tightfit.memory.overhead import allocation_size, device_overhead
from tightfit.memory.report import StepMemory
from tightfit.models.checkpointing import disable_kv_cache
from tightfit.step.batch import move_to_device
from tightfit.step.optim import build_optimizer

ModelFactory = Callable[[], nn.Module]


class EstimationError(TightfitError):
    """The step could not be traced on fake tensors (data-dependent operators, unsupported kernels).

    Callers fall back to :func:`tightfit.memory.measure.measure_step` on real tensors.
    """


def estimate_step(
    model: nn.Module | ModelFactory,
    batch_factory: BatchFactory,
    *,
    batch_size: int,
    precision: str = "fp32",
    optimizer: str = "adamw",
    checkpointing: bool | str | list[str] = False,
    accumulation_steps: int = 1,
    clip_grad_norm: float | None = None,
    profile: Any = None,
    count_flops: bool = True,
    foreach: bool | None = None,
) -> StepMemory:
    """Estimate the peak memory of one steady-state training step without allocating weights.

    Args:
        model: an ``nn.Module`` (real or meta weights: swapped for fake tensors during the
            estimate and put back, nothing copied) or a factory ``() -> nn.Module``, called under
            ``torch.device("meta")``.
        batch_factory: ``(batch_size, device) -> batch`` in a form ``tightfit.step.loss`` takes;
            called under fake mode, so its tensors are fake too.
        batch_size: the micro-batch size.
        precision: ``fp32``, ``fp16``, ``bf16`` (autocast) or ``bf16-pure``.
        optimizer: a name from ``tightfit.step.optim.OPTIMIZERS``.
        checkpointing: False, True (= "auto": the repeated blocks), or a list of module names;
            applied to the model in place.
        accumulation_steps: micro-batches per optimizer step.
        clip_grad_norm: the run's gradient clipping, if any.
        profile: the target ``DeviceProfile``; adds its overhead (CUDA, MPS). None: CPU, no overhead.
        count_flops: also count the FLOPs of one micro-batch (about half the time).
        foreach: the optimizer's and gradient norm's multi-tensor kernels; None: what the target
            runs by default (on for CUDA, off elsewhere).

    Returns:
        A :class:`StepMemory` with ``method="estimated"``.

    Raises:
        EstimationError: the model or step cannot run on fake tensors (the reason is in the message).
        ConfigError: invalid settings (unknown precision or optimizer, bad checkpointing names).

    Example:
        >>> memory = estimate_step(lambda: build_model("torchvision:resnet50"), batch_factory, batch_size=32)
        >>> memory.peak_bytes, memory.breakdown["activations"]
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    settings = StepSettings(batch_size, precision, optimizer, accumulation_steps, clip_grad_norm)
    started = time.perf_counter()
    if not isinstance(model, nn.Module):
        model = _build_on_meta(model)
    blocks = apply_checkpointing(model, checkpointing)
    disable_kv_cache(model)
    device_type = getattr(profile, "device_type", "cpu")
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    model.train()
    with _fake_weights(model, fake_mode, precision):
        try:
            with fake_mode:
                memory, tracker = _estimate(model, batch_factory, settings, device_type, count_flops, foreach)
        except TightfitError:
            raise
        except Exception as error:  # noqa: BLE001 - tracing arbitrary models fails in many ways
            raise EstimationError(_tracing_failure(error)) from error
    overhead = device_overhead(
        profile, tensor_peak_bytes=tracker.peak_bytes, allocated_peak_bytes=tracker.peak_allocated_bytes
    )
    notes = settings.notes(blocks)
    if overhead.total_bytes:
        notes.append(f"{overhead.describe()} (profile {getattr(profile, 'name', '?')})")
    notes.append(f"estimated in {time.perf_counter() - started:.2f} s on fake tensors")
    memory.breakdown["overhead"] = overhead.total_bytes
    memory.peak_bytes += overhead.total_bytes
    memory.notes = notes
    return memory


def _estimate(
    model: nn.Module,
    batch_factory: BatchFactory,
    settings: StepSettings,
    device_type: str,
    count_flops: bool,
    foreach: bool | None,
):
    # Foreach kernels where the target runs them: the fake tensors live on the CPU, where torch
    # would pick the one-tensor-at-a-time loops.
    if foreach is None:
        foreach = device_type == "cuda"
    optimizer = build_optimizer(settings.optimizer, model.parameters(), foreach=foreach)
    _create_optimizer_state(model, optimizer)
    window = batch_factory(settings.window_size, "cpu")  # host data, as the trainer's loader gives it
    # Autocast runs on the CPU here whatever the target: the fake tensors live on the CPU and the
    # CPU and CUDA autocast lists agree on which operators run in low precision. On a device the
    # trainer copies each micro-batch from the host; a copy stands in for it.
    transfer = None if device_type == "cpu" else (lambda batch: move_to_device(batch, "cpu", copy=True))
    step = make_step(model, optimizer, settings, torch.device("cpu"), transfer=transfer, foreach=foreach)
    tracker, flops = counted_step(step, window, allocation_size=allocation_size(device_type), count_flops=count_flops)
    memory = StepMemory(
        peak_bytes=tracker.peak_bytes,
        breakdown=tracker.breakdown,
        by_module=tracker.by_module,
        flops=flops,
        method="estimated",
        notes=[],
        **tracker.moments(),
    )
    return memory, tracker


def _build_on_meta(model_factory: ModelFactory) -> nn.Module:
    try:
        with torch.device("meta"):
            return model_factory()
    except TightfitError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure of user model code
        raise EstimationError(
            f"building the model on the meta device failed: {type(error).__name__}: {error}"
        ) from error


def _create_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Leave the model and optimizer as a warm-up step would: optimizer state, no gradients.

    On fake tensors a full warm-up step would only cost time: one ``optimizer.step()`` on
    gradients of the right shapes creates the same state tensors; the step then drops the
    gradients (``zero_grad(set_to_none=True)``), as the trainer's step does at its end.
    """
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _fake_weights(model: nn.Module, fake_mode, precision: str) -> Iterator[None]:
    """Swap every parameter and buffer of ``model`` for a fake CPU tensor; put them back on exit.

    Tied weights stay tied (one fake tensor per original). With ``bf16-pure`` the floating
    parameters and buffers are made bf16 here, as ``model.to(torch.bfloat16)`` would.
    """
    originals: list[tuple[dict, str, torch.Tensor]] = []
    fakes: dict[int, torch.Tensor] = {}

    def fake_of(tensor: torch.Tensor, is_parameter: bool) -> torch.Tensor:
        if id(tensor) not in fakes:
            dtype = tensor.dtype
            if precision == "bf16-pure" and tensor.is_floating_point():
                dtype = torch.bfloat16
            with fake_mode:
                fake = torch.empty_strided(tuple(tensor.shape), tuple(tensor.stride()), dtype=dtype, device="cpu")
            if is_parameter:
                fake = nn.Parameter(fake, requires_grad=tensor.requires_grad)
            fakes[id(tensor)] = fake
        return fakes[id(tensor)]

    try:
        for module in model.modules():
            for table, is_parameter in ((module._parameters, True), (module._buffers, False)):
                for name, tensor in list(table.items()):
                    if tensor is None:
                        continue
                    originals.append((table, name, tensor))
                    table[name] = fake_of(tensor, is_parameter)
        yield
    finally:
        for table, name, tensor in reversed(originals):
            table[name] = tensor


def _tracing_failure(error: Exception) -> str:
    from torch._subclasses import fake_tensor

    data_dependent = (
        fake_tensor.DataDependentOutputException,
        fake_tensor.DynamicOutputShapeException,
    )
    kind = "a data-dependent operator" if isinstance(error, data_dependent) else type(error).__name__
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return (
        f"the training step cannot be traced on fake tensors ({kind}: {text[:300]}); "
        "measure it on real tensors instead (measure_step, or tightfit plan --measure)"
    )
