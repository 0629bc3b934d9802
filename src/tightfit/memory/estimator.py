"""Peak memory of a training step: estimated on fake tensors, or measured on real ones.

Both run the same step (:func:`training_step`) under the same counter
(:class:`~tightfit.memory.tracker.MemoryTracker`); only the tensors differ. The estimate runs under
``FakeTensorMode``: every tensor has its shape, dtype and storage size but no memory, so a 7B
decoder is planned on a laptop in seconds and, on CPU, estimate and measurement agree to the byte
wherever the kernels allocate the same outputs.

The step (the contract every part of tightfit uses)::

    optimizer.zero_grad(set_to_none=True)
    for each micro-batch (accumulation_steps of them):
        with autocast(precision):                 # bf16-pure: model and batch floats in bf16
            output, loss = forward_and_loss(model, batch)
        (loss / accumulation_steps).backward()    # through a GradScaler for fp16 on CUDA
    optimizer.step()

Peak = the largest total of live storage bytes over that step, after one warm-up step so the
optimizer state exists. With accumulation, micro-batches 2..k all hold the gradients of the earlier
ones, so the first two micro-batches already reach the peak and only those two are run.
"""

import contextlib
import gc
import random
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from tightfit.errors import ConfigError, TightfitError
from tightfit.memory.overhead import allocation_size, device_overhead
from tightfit.memory.report import StepMemory
from tightfit.memory.tracker import MemoryTracker
from tightfit.models.checkpointing import disable_kv_cache
from tightfit.step.batch import cast_floats
from tightfit.step.loss import forward_and_loss
from tightfit.step.optim import build_optimizer
from tightfit.step.precision import PRECISIONS, autocast, needs_grad_scaler
from tightfit.units import format_bytes

ModelFactory = Callable[[], nn.Module]
BatchFactory = Callable[[int, Any], Any]


class EstimationError(TightfitError):
    """The step could not be traced on fake tensors (data-dependent operators, unsupported kernels).

    Callers fall back to :func:`measure_step` on real tensors.
    """


# ----------------------------------------------------------------------------------- the step
def training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    make_batch: Callable[[], Any],
    *,
    precision: str = "fp32",
    device_type: str = "cpu",
    accumulation_steps: int = 1,
    scaler: Any = None,
    count_flops: bool = False,
) -> int | None:
    """Run one training step as the memory engine defines it (see the module docstring).

    Args:
        model: the model, already on its device (and in bf16 for ``bf16-pure``).
        optimizer: its optimizer.
        make_batch: returns one micro-batch on the model's device.
        precision: one of ``PRECISIONS``.
        device_type: the device type autocast runs on.
        accumulation_steps: micro-batches per optimizer step; at most two are run (see above).
        scaler: a ``torch.amp.GradScaler`` for fp16 on CUDA/MPS, else None.
        count_flops: count the FLOPs of the first micro-batch's forward and backward.

    Returns:
        The FLOPs of one micro-batch when ``count_flops``, else None.
    """
    with _cyclic_gc_paused(collect_first=device_type != "cpu"):
        return _training_step(
            model, optimizer, make_batch, precision=precision, device_type=device_type,
            accumulation_steps=accumulation_steps, scaler=scaler, count_flops=count_flops,
        )


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


def _training_step(model, optimizer, make_batch, *, precision, device_type, accumulation_steps, scaler, count_flops):
    optimizer.zero_grad(set_to_none=True)
    flops = None
    batch = None
    for micro_step in range(min(accumulation_steps, 2)):
        batch = make_batch()
        counter = None
        if count_flops and micro_step == 0:
            counter = _flop_counter()
        with counter if counter is not None else contextlib.nullcontext():
            with autocast(precision, device_type):
                output, loss = forward_and_loss(model, batch)
            del output  # the autograd graph keeps what backward needs
            if accumulation_steps > 1:
                loss = loss / accumulation_steps
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if counter is not None:
            flops = counter.get_total_flops()
        del loss
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    del batch  # like a loop variable, the last micro-batch lives until the step is done
    return flops


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


def _prepare(
    model: nn.Module, *, precision: str, checkpointing: bool | str | list[str]
) -> list[str]:
    """Check the settings and apply checkpointing in place; returns the checkpointed block names."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision: unknown value {precision!r} (choose from {', '.join(PRECISIONS)})")
    if not checkpointing:
        return []
    from tightfit.models.checkpointing import apply_activation_checkpointing

    targets = "auto" if checkpointing is True else checkpointing
    return apply_activation_checkpointing(model, targets)


def _batch_maker(batch_factory: BatchFactory, batch_size: int, device: Any, precision: str) -> Callable[[], Any]:
    def make_batch() -> Any:
        batch = batch_factory(batch_size, device)
        return cast_floats(batch, torch.bfloat16) if precision == "bf16-pure" else batch

    return make_batch


def _notes(precision: str, optimizer_name: str, batch_size: int, accumulation_steps: int, blocks: list[str]) -> list[str]:
    notes = [f"batch size {batch_size}, precision {precision}, optimizer {optimizer_name}"]
    if accumulation_steps > 1:
        notes.append(f"gradient accumulation over {accumulation_steps} micro-batches: gradients stay live")
    if blocks:
        notes.append(f"activation checkpointing on {len(blocks)} blocks ({blocks[0]}, ...)")
    return notes


# ---------------------------------------------------------------------------- the estimator
def estimate_step(
    model_factory: ModelFactory,
    batch_factory: BatchFactory,
    *,
    batch_size: int,
    precision: str = "fp32",
    optimizer: str = "adamw",
    checkpointing: bool | str | list[str] = False,
    accumulation_steps: int = 1,
    profile: Any = None,
) -> StepMemory:
    """Estimate the peak memory of one steady-state training step without allocating weights.

    The model is built on the meta device and its parameters and buffers replaced by fake
    tensors; the step then runs under ``FakeTensorMode``, counted by the same tracker as a
    measurement.

    Args:
        model_factory: ``() -> nn.Module``; called under ``torch.device("meta")``.
        batch_factory: ``(batch_size, device) -> batch`` in a form ``tightfit.step.loss`` takes;
            called under fake mode, so its tensors are fake too.
        batch_size: the micro-batch size.
        precision: ``fp32``, ``fp16``, ``bf16`` (autocast) or ``bf16-pure``.
        optimizer: a name from ``tightfit.step.optim.OPTIMIZERS``.
        checkpointing: False, True (= "auto": the repeated blocks), or a list of module names.
        accumulation_steps: micro-batches per optimizer step.
        profile: the target ``DeviceProfile``; adds its overhead (CUDA, MPS). None: CPU, no overhead.

    Returns:
        A :class:`StepMemory` with ``method="estimated"`` and the FLOPs of one micro-batch.

    Raises:
        EstimationError: the model or step cannot run on fake tensors (the reason is in the message).
        ConfigError: invalid settings (unknown precision or optimizer, bad checkpointing names).

    Example:
        >>> memory = estimate_step(lambda: build_model("torchvision:resnet50"), batch_factory, batch_size=32)
        >>> memory.peak_bytes, memory.breakdown["activations"]
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    _check_settings(batch_size, accumulation_steps)
    started = time.perf_counter()
    try:
        with torch.device("meta"):
            model = model_factory()
    except TightfitError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure of user model code
        raise EstimationError(f"building the model on the meta device failed: {type(error).__name__}: {error}") from error
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with _fake_weights(model, fake_mode, precision):
        memory = _estimate_prepared(
            model, fake_mode, batch_factory, batch_size=batch_size, precision=precision, optimizer_name=optimizer,
            checkpointing=checkpointing, accumulation_steps=accumulation_steps, profile=profile,
        )
    memory.notes.append(f"estimated in {time.perf_counter() - started:.2f} s on fake tensors")
    return memory


def estimate_model_step(
    model: nn.Module,
    batch_factory: BatchFactory,
    *,
    batch_size: int,
    precision: str = "fp32",
    optimizer: str = "adamw",
    accumulation_steps: int = 1,
    profile: Any = None,
    count_flops: bool = True,
) -> StepMemory:
    """Like :func:`estimate_step` for a model that already exists (real or meta weights).

    Its parameters and buffers are swapped for fake tensors during the estimate and put back
    afterwards: nothing is copied and the model is left as it was. Checkpointing, if wanted, is
    already applied to the model. ``count_flops=False`` skips the FLOP count (about half the time).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    _check_settings(batch_size, accumulation_steps)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with _fake_weights(model, fake_mode, precision):
        return _estimate_prepared(
            model, fake_mode, batch_factory, batch_size=batch_size, precision=precision, optimizer_name=optimizer,
            checkpointing=False, accumulation_steps=accumulation_steps, profile=profile, count_flops=count_flops,
        )


def _estimate_prepared(
    model: nn.Module,
    fake_mode,
    batch_factory: BatchFactory,
    *,
    batch_size: int,
    precision: str,
    optimizer_name: str,
    checkpointing,
    accumulation_steps: int,
    profile: Any,
    count_flops: bool = True,
) -> StepMemory:
    blocks = _prepare(model, precision=precision, checkpointing=checkpointing)
    disable_kv_cache(model)
    device_type = getattr(profile, "device_type", "cpu")
    model.train()
    try:
        with fake_mode:
            optimizer = build_optimizer(optimizer_name, model.parameters())
            _create_optimizer_state(model, optimizer)
            make_batch = _batch_maker(batch_factory, batch_size, "cpu", precision)
            with MemoryTracker(model, optimizer, allocation_size=allocation_size(device_type)) as tracker:
                # Autocast runs on the CPU here whatever the target: the fake tensors live on the CPU
                # and the CPU and CUDA autocast lists agree on which operators run in low precision.
                flops = training_step(
                    model, optimizer, make_batch, precision=precision, device_type="cpu",
                    accumulation_steps=accumulation_steps, count_flops=count_flops,
                )
    except TightfitError:
        raise
    except Exception as error:  # noqa: BLE001 - tracing arbitrary models fails in many ways
        raise EstimationError(_tracing_failure(error)) from error
    overhead = device_overhead(
        profile, tensor_peak_bytes=tracker.peak_bytes, allocated_peak_bytes=tracker.peak_allocated_bytes
    )
    notes = _notes(precision, optimizer_name, batch_size, accumulation_steps, blocks)
    if overhead.total_bytes:
        notes.append(f"{overhead.describe()} (profile {getattr(profile, 'name', '?')})")
    breakdown = tracker.breakdown
    breakdown["overhead"] = overhead.total_bytes
    return StepMemory(
        peak_bytes=tracker.peak_bytes + overhead.total_bytes,
        breakdown=breakdown,
        by_module=tracker.by_module,
        flops=flops,
        method="estimated",
        notes=notes,
    )


def _create_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Leave the model and optimizer as a warm-up step would: optimizer state and live gradients.

    On fake tensors a full warm-up step would only cost time: one ``optimizer.step()`` on
    gradients of the right shapes creates the same state tensors, and the gradients stay set, as
    after a real step (the next step's ``zero_grad`` frees them).
    """
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.grad = torch.zeros_like(parameter)
    optimizer.step()


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


def _check_settings(batch_size: int, accumulation_steps: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size: must be a positive integer, got {batch_size!r}")
    if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
        raise ConfigError(f"accumulation_steps: must be a positive integer, got {accumulation_steps!r}")


# ----------------------------------------------------------------------------- measurement
def resolve_device(device: Any = None) -> torch.device:
    """``None``/``"auto"``: CUDA if present, else MPS, else CPU; otherwise ``torch.device(device)``."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"device: cannot use {device!r} ({error})") from None


def measure_step(
    model_factory: ModelFactory,
    batch_factory: BatchFactory,
    *,
    batch_size: int,
    precision: str = "fp32",
    optimizer: str = "adamw",
    checkpointing: bool | str | list[str] = False,
    accumulation_steps: int = 1,
    device: Any = None,
    budget_bytes: int | None = None,
) -> StepMemory:
    """Measure the peak memory of one steady-state training step on real tensors.

    Builds the model, runs a warm-up step, then tracks the next step with
    :class:`MemoryTracker`. Both steps run under ``budget_bytes`` when given.

    Args:
        model_factory, batch_factory, batch_size, precision, optimizer, checkpointing,
            accumulation_steps: as for :func:`estimate_step`.
        device: where to run (``None``: CUDA, else MPS, else CPU).
        budget_bytes: a simulated memory budget: ``torch.OutOfMemoryError`` when live tensor
            bytes would exceed it.

    Returns:
        A :class:`StepMemory` with ``method="measured"``. On CUDA, ``overhead`` is what the
        caching allocator reserved beyond the tensors (``max_memory_reserved`` minus the tensor
        peak); the notes give ``max_memory_allocated`` and ``max_memory_reserved``.

    Raises:
        torch.OutOfMemoryError: the step does not fit (the budget, or the device itself).
        ConfigError: invalid settings.
    """
    _check_settings(batch_size, accumulation_steps)
    device = resolve_device(device)
    model = model_factory()
    if precision == "bf16-pure":
        model = model.to(torch.bfloat16)
    model = model.to(device)
    blocks = _prepare(model, precision=precision, checkpointing=checkpointing)
    memory = measure_model_step(
        model, batch_factory, batch_size=batch_size, precision=precision, optimizer=optimizer,
        accumulation_steps=accumulation_steps, device=device, budget_bytes=budget_bytes,
    )
    if blocks:
        memory.notes.append(f"activation checkpointing on {len(blocks)} blocks ({blocks[0]}, ...)")
    return memory


def measure_model_step(
    model: nn.Module,
    batch_factory: BatchFactory,
    *,
    batch_size: int,
    precision: str = "fp32",
    optimizer: str = "adamw",
    accumulation_steps: int = 1,
    device: Any = None,
    budget_bytes: int | None = None,
) -> StepMemory:
    """Like :func:`measure_step` on an existing model (on ``device``, prepared for ``precision``).

    The model's weights change (two optimizer steps); :func:`tightfit.memory.search.find_batch_size`
    saves and restores them around its trials.
    """
    _check_settings(batch_size, accumulation_steps)
    device = resolve_device(device)
    model.train()
    disable_kv_cache(model)
    step_optimizer = build_optimizer(optimizer, model.parameters())
    scaler = torch.amp.GradScaler(device.type) if needs_grad_scaler(precision, device.type) else None
    make_batch = _batch_maker(batch_factory, batch_size, device, precision)
    settings = dict(precision=precision, device_type=device.type, accumulation_steps=accumulation_steps, scaler=scaler)
    with MemoryTracker(model, step_optimizer, budget_bytes=budget_bytes):
        training_step(model, step_optimizer, make_batch, **settings)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with MemoryTracker(model, step_optimizer, budget_bytes=budget_bytes) as tracker:
        flops = training_step(model, step_optimizer, make_batch, count_flops=True, **settings)
    breakdown = tracker.breakdown
    notes = _notes(precision, optimizer, batch_size, accumulation_steps, [])
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
    step_optimizer.zero_grad(set_to_none=True)
    return StepMemory(
        peak_bytes=sum(breakdown.values()),
        breakdown=breakdown,
        by_module=tracker.by_module,
        flops=flops,
        method="measured",
        notes=notes,
    )


def rng_state() -> dict[str, Any]:
    """Every random generator a training step may draw from: Python, NumPy, torch CPU and CUDA."""
    import numpy

    state = {"python": random.getstate(), "numpy": numpy.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what :func:`rng_state` saved."""
    import numpy

    random.setstate(state["python"])
    numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
