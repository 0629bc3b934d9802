"""Count live tensor storages during a block of code: the peak, what it is made of, and a budget.

The tracker is a ``TorchDispatchMode``: every tensor an operator returns passes through it, and
the first time it sees a storage it adds the storage's bytes to the live total and keeps a weak
reference whose callback subtracts them when the storage is freed. Each storage is counted once,
so views are free. Storages that exist before the block (parameters, buffers, gradients and
optimizer state left by a warm-up step) are registered when the block starts.

Every live storage carries a category and an owner module:

* ``parameters``: the model's parameters and buffers;
* ``gradients``: a storage becomes a gradient when autograd accumulates it into ``param.grad``
  (a post-accumulate-grad hook retags it; before that it is a backward temporary);
* ``optimizer``: tensors in ``optimizer.state`` (retagged after every ``optimizer.step``);
* ``optimizer_temporaries``: what ``optimizer.step`` allocates and is not its state: the foreach
  kernels' per-tensor outputs (``_foreach_sqrt`` of every second moment, ...), the for-loop's
  temporaries; a buffer the user would cut with ``foreach=False`` or a fused or 8-bit optimizer;
* ``activations``: everything else — saved activations, temporaries, the batch.

Each moment of a step has its own peak (``moment_peaks``), and the step's peak names its moment
(``peak_moment``): ``forward end`` (from the model's forward on, where the saved activations
are most at its end), ``backward`` (from autograd's backward on, through gradient clipping), or
``optimizer step`` (inside ``optimizer.step``).

The same class counts real tensors (a measurement) and fake tensors (the estimator runs it under
``FakeTensorMode``), so on CPU an estimate and a measurement agree by construction.

The idea follows ``torch.distributed._tools.mem_tracker``; that module is private and refuses
repeated iterations, so tightfit has its own.
"""

import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tightfit.units import format_bytes

PARAMETERS, GRADIENTS, OPTIMIZER, ACTIVATIONS = "parameters", "gradients", "optimizer", "activations"
OPTIMIZER_TEMPORARIES = "optimizer_temporaries"
CATEGORIES = (PARAMETERS, GRADIENTS, OPTIMIZER, OPTIMIZER_TEMPORARIES, ACTIVATIONS)
FORWARD_END, BACKWARD, OPTIMIZER_STEP = "forward end", "backward", "optimizer step"
MOMENTS = (FORWARD_END, BACKWARD, OPTIMIZER_STEP)
BACKWARD_OWNER = "(backward)"
OTHER_OWNER = "(other)"
ROOT_OWNER = "(root)"


# Normalisation statistics that the real CPU and CUDA kernels keep in fp32 (the "opmath" type)
# when the input is bf16/fp16, but whose meta kernels return in the input's dtype: operator ->
# indices of those outputs. Counted as fp32 so fake and real tensors agree.
_FP32_STATISTICS = {
    "aten.native_layer_norm.default": (1, 2),
    "aten.native_group_norm.default": (1, 2),
    "aten._native_batch_norm_legit.default": (1, 2),
    "aten._native_batch_norm_legit.no_stats": (1, 2),
    "aten._native_batch_norm_legit_functional.default": (1, 2),
    "aten.native_batch_norm.default": (1, 2),
}


class _Record:
    """One live storage: its size, category and owner, and the weak reference that frees it."""

    __slots__ = ("nbytes", "storage_nbytes", "category", "owner", "reference", "sequence")

    def __init__(self, nbytes: int, category: str, owner: str, reference: weakref.ref, sequence: int):
        self.nbytes = nbytes
        self.storage_nbytes = nbytes
        self.sequence = sequence
        self.category = category
        self.owner = owner
        self.reference = reference


class MemoryTracker(TorchDispatchMode):
    """Count live tensor storages inside a ``with`` block; optionally enforce a memory budget.

    Args:
        model: the model being trained; its parameters and buffers are registered at entry and
            its top-level children name the owners in ``by_module``.
        optimizer: its state is registered at entry and after every ``step()``.
        budget_bytes: when set, an operator whose outputs would take the live bytes over the
            budget raises ``torch.OutOfMemoryError`` (the real class), as a GPU would.
        allocation_size: maps a storage's bytes to what the device allocator would reserve for
            it (CUDA rounds to 512 bytes); ``peak_allocated_bytes`` follows it. Identity if None.
        host_data: tensors (any nesting) made before the step by the data loader, such as the
            window of samples a training step slices its micro-batches from. Their storages are
            never counted, also when the step takes views of them: host data is not part of a
            step's peak, what the step copies to its device is.

    Attributes (valid during and after the block):
        peak_bytes: the largest total of live storage bytes seen.
        breakdown: bytes per category at that peak (``parameters``, ``gradients``, ``optimizer``,
            ``optimizer_temporaries``, ``activations``; ``overhead`` is 0: tensors only).
        peak_moment: when that peak was: ``forward end``, ``backward`` or ``optimizer step``.
        moment_peaks: the largest live total in each moment that was reached.
        by_module: bytes per owner at that peak (top-level module names, ``(backward)``,
            ``(other)``, ``(root)`` for tensors owned by the model itself).
        live_bytes: bytes live now.
        peak_allocated_bytes: the peak of ``allocation_size``-rounded bytes.

    Example:
        >>> with MemoryTracker(model, optimizer, budget_bytes=2 * 2**30) as tracker:
        ...     training_step()
        >>> tracker.peak_bytes, tracker.breakdown["activations"]
    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        budget_bytes: int | None = None,
        allocation_size: Callable[[int], int] | None = None,
        host_data: Any = None,
    ):
        super().__init__()
        self._host_storages = [
            storage
            for value in tree_flatten(host_data)[0]
            if isinstance(value, torch.Tensor)
            for storage in [_storage_of(value)]
            if storage is not None
        ]
        self._host_keys = {id(storage) for storage in self._host_storages}
        self.model = model
        self.optimizer = optimizer
        self.budget_bytes = budget_bytes
        self.allocation_size = allocation_size or (lambda nbytes: nbytes)
        self.live_bytes = 0
        self.live_allocated_bytes = 0
        self.peak_bytes = 0
        self.peak_allocated_bytes = 0
        self._breakdown = {**dict.fromkeys(CATEGORIES, 0), "overhead": 0}
        self.peak_moment = FORWARD_END
        self.moment_peaks: dict[str, int] = {}
        self._moment = FORWARD_END  # the moment of the step the latest event began
        self._in_optimizer_step = False
        self._by_module: dict[str, int] = {}
        self._peak_pending = False
        self._sequence = 0  # registrations so far; a record with a sequence <= _snapshot_sequence was live at the peak
        self._snapshot_sequence = 0
        self._records: dict[int, _Record] = {}
        self._by_category = dict.fromkeys(CATEGORIES, 0)
        self._by_owner: dict[str, int] = {}
        self._owner_of_parameter: dict[int, str] = {}
        self._module_stack: list[str] = []
        self._handles: list = []
        self._active = False

    # ----------------------------------------------------------------------------- the block
    def __enter__(self):
        self._active = True
        if self.model is not None:
            self._register_model()
        if self.optimizer is not None:
            self._register_optimizer_state()
            self._handles.append(self.optimizer.register_step_pre_hook(self._before_optimizer_step))
            self._handles.append(self.optimizer.register_step_post_hook(self._after_optimizer_step))
        self._update_peak(force=True)
        return super().__enter__()

    def __exit__(self, exc_type, exc_value, traceback):
        try:
            return super().__exit__(exc_type, exc_value, traceback)
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._take_pending_snapshot()
            self._active = False
            # Dropping the weak references drops their callbacks: frees after the block are not counted.
            self._records.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        outputs = func(*args, **(kwargs or {}))
        self._register_outputs(outputs, str(func))
        return outputs

    # ------------------------------------------------------------------------- registration
    def _register_model(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._forward_starts))
        for name, child in self.model.named_children():
            for parameter in child.parameters():
                self._owner_of_parameter.setdefault(id(parameter), name)
            self._handles.append(child.register_forward_pre_hook(partial(self._enter_module, name)))
            self._handles.append(child.register_forward_hook(partial(self._leave_module, name), always_call=True))
        for parameter in self.model.parameters():
            owner = self._owner_of_parameter.setdefault(id(parameter), ROOT_OWNER)
            self._track(parameter, PARAMETERS, owner)
            for part in _quantization_constants(parameter):
                self._track(part, PARAMETERS, owner)
            if parameter.grad is not None:
                self._track(parameter.grad, GRADIENTS, owner)
            if parameter.requires_grad:
                self._handles.append(parameter.register_post_accumulate_grad_hook(self._after_grad_accumulated))
        for name, buffer in self.model.named_buffers():
            top = name.split(".", 1)[0] if "." in name else ROOT_OWNER
            self._track(buffer, PARAMETERS, top)

    def _register_optimizer_state(self) -> None:
        for parameter, state in self.optimizer.state.items():
            owner = self._owner_of_parameter.get(id(parameter), ROOT_OWNER)
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    self._track(value, OPTIMIZER, owner)

    def _forward_starts(self, module, args) -> None:
        if torch._C._current_graph_task_id() == -1:  # not a recomputation inside backward
            self._moment = FORWARD_END

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        self._moment = OPTIMIZER_STEP
        self._in_optimizer_step = True

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        self._in_optimizer_step = False
        self._register_optimizer_state()
        self._update_peak()

    def _after_grad_accumulated(self, parameter: torch.Tensor) -> None:
        if parameter.grad is not None:
            self._track(parameter.grad, GRADIENTS, self._owner_of_parameter.get(id(parameter), ROOT_OWNER))
            self._update_peak()

    def _enter_module(self, name: str, module, args) -> None:
        self._module_stack.append(name)

    def _leave_module(self, name: str, module, args, output) -> None:
        if self._module_stack and self._module_stack[-1] == name:
            self._module_stack.pop()

    def _current_owner(self) -> str:
        if self._module_stack:
            return self._module_stack[-1]
        if torch._C._current_graph_task_id() != -1:  # inside autograd's backward pass
            return BACKWARD_OWNER
        return OTHER_OWNER

    def _track(self, tensor: torch.Tensor, category: str, owner: str) -> None:
        """Register ``tensor``'s storage if new; (re)tag it with ``category`` and ``owner``."""
        inner = _inner_tensors(tensor)
        if inner is not None:  # a quantized weight: count its int8 data and scales, not a float-sized shell
            for part in inner:
                self._track(part, category, owner)
            return
        storage = _storage_of(tensor)
        if storage is None:
            return
        key = id(storage)
        record = self._records.get(key)
        if record is None:
            self._add(storage, storage.nbytes(), category, owner)
            return
        if record.category != category or record.owner != owner:
            if not self._peak_pending and record.sequence <= self._snapshot_sequence:
                # It was live at the peak: its final tag is its true one there too (a gradient is
                # born a backward temporary, and autograd frees other temporaries before it
                # becomes ``param.grad``).
                self._retag_snapshot(record, category, owner)
            self._move(record, -1)
            record.category, record.owner = category, owner
            self._move(record, +1)

    def _register_outputs(self, outputs, operator: str = "") -> None:
        if not self._active:
            return
        new: list[tuple[torch.UntypedStorage, int]] = []
        grown: list[tuple[_Record, int]] = []
        seen: set[int] = set()
        fp32_statistics = _FP32_STATISTICS.get(operator, ())
        for index, value in enumerate(tree_flatten(outputs)[0]):
            if not isinstance(value, torch.Tensor):
                continue
            storage = _storage_of(value)
            if storage is None or id(storage) in seen or id(storage) in self._host_keys:
                continue
            seen.add(id(storage))
            nbytes = storage.nbytes()
            record = self._records.get(id(storage))
            if record is None:
                if index in fp32_statistics and value.dtype in (torch.bfloat16, torch.float16):
                    nbytes *= 2
                new.append((storage, nbytes))
            elif record.storage_nbytes != nbytes:  # resized in place (resize_, out= arguments)
                grown.append((record, nbytes))
        if not new and not grown:
            return
        added = sum(nbytes for _, nbytes in new) + sum(nbytes - record.nbytes for record, nbytes in grown)
        if self.budget_bytes is not None and added > 0 and self.live_bytes + added > self.budget_bytes:
            raise torch.OutOfMemoryError(
                f"simulated out of memory: tried to allocate {format_bytes(added)} with "
                f"{format_bytes(self.live_bytes)} live, over the budget of {format_bytes(self.budget_bytes)} "
                "(tightfit MemoryTracker)"
            )
        owner = self._current_owner()
        category = OPTIMIZER_TEMPORARIES if self._in_optimizer_step else ACTIVATIONS
        for storage, nbytes in new:
            self._add(storage, nbytes, category, owner).storage_nbytes = storage.nbytes()
        for record, nbytes in grown:
            self._move(record, -1)
            record.nbytes = record.storage_nbytes = nbytes
            self._move(record, +1)
        self._update_peak()

    # --------------------------------------------------------------------------- accounting
    def _add(self, storage: torch.UntypedStorage, nbytes: int, category: str, owner: str) -> _Record:
        key = id(storage)
        self._sequence += 1
        record = _Record(nbytes, category, owner, weakref.ref(storage, partial(self._on_free, key)), self._sequence)
        self._records[key] = record
        self._move(record, +1)
        return record

    def _on_free(self, key: int, reference: weakref.ref) -> None:
        record = self._records.get(key)
        if record is not None and record.reference is reference:
            self._take_pending_snapshot()
            del self._records[key]
            self._move(record, -1)

    def _move(self, record: _Record, sign: int) -> None:
        self.live_bytes += sign * record.nbytes
        self.live_allocated_bytes += sign * self.allocation_size(record.nbytes)
        self._by_category[record.category] += sign * record.nbytes
        self._by_owner[record.owner] = self._by_owner.get(record.owner, 0) + sign * record.nbytes

    def _update_peak(self, force: bool = False) -> None:
        if self.live_allocated_bytes > self.peak_allocated_bytes:
            self.peak_allocated_bytes = self.live_allocated_bytes
        if not self._in_optimizer_step and torch._C._current_graph_task_id() != -1:
            self._moment = BACKWARD  # and stays so, through clipping, until a forward or the optimizer
        if self.live_bytes > self.moment_peaks.get(self._moment, -1):
            self.moment_peaks[self._moment] = self.live_bytes
        if force or self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
            self.peak_moment = self._moment
            # The breakdown is taken lazily, just before the next free: between the peak and that
            # moment tags may still change (a gradient is created as a backward temporary and
            # becomes ``param.grad`` right after), and the later tag is the true one.
            self._peak_pending = True

    def _take_pending_snapshot(self) -> None:
        if self._peak_pending:
            self._peak_pending = False
            self._snapshot_sequence = self._sequence
            self._breakdown = {**self._by_category, "overhead": 0}
            self._by_module = {owner: nbytes for owner, nbytes in self._by_owner.items() if nbytes}

    def _retag_snapshot(self, record: _Record, category: str, owner: str) -> None:
        self._breakdown[record.category] -= record.nbytes
        self._breakdown[category] += record.nbytes
        self._by_module[record.owner] = self._by_module.get(record.owner, 0) - record.nbytes
        self._by_module[owner] = self._by_module.get(owner, 0) + record.nbytes
        if not self._by_module[record.owner]:
            del self._by_module[record.owner]

    @property
    def breakdown(self) -> dict[str, int]:
        """Bytes per category at the peak (``overhead`` is 0: the tracker counts tensors only)."""
        self._take_pending_snapshot()
        return dict(self._breakdown)

    def moments(self) -> dict:
        """``peak_moment`` and ``moment_peaks``, as :class:`~tightfit.memory.report.StepMemory` takes them."""
        return {"peak_moment": self.peak_moment, "moment_peaks": dict(self.moment_peaks)}

    @property
    def by_module(self) -> dict[str, int]:
        """Bytes per owner (top-level module, ``(backward)``, ``(other)``, ``(root)``) at the peak."""
        self._take_pending_snapshot()
        return dict(self._by_module)


def _inner_tensors(tensor: torch.Tensor) -> list[torch.Tensor] | None:
    """The tensors a wrapper tensor subclass is made of (torchao's ``Int8Tensor``: ``qdata``,
    ``scale``, ``zero_point``), or None for a plain tensor. The wrapper's own storage reports the
    bytes of its outer dtype (4 per int8 weight), which is not what it holds."""
    if type(tensor) in (torch.Tensor, torch.nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return None
    names, _ = tensor.__tensor_flatten__()
    return [part for part in (getattr(tensor, name) for name in names) if isinstance(part, torch.Tensor)]


def _quantization_constants(parameter: torch.Tensor) -> list[torch.Tensor]:
    """The tensors a bitsandbytes 4-bit weight keeps beside its packed bytes (``quant_state``:
    absmax, code, and the second-level state of double quantization): real memory, held outside
    the module's parameters and buffers."""
    found, pending = [], [getattr(parameter, "quant_state", None)]
    while pending:
        state = pending.pop()
        if state is None:
            continue
        for value in vars(state).values():
            if isinstance(value, torch.Tensor):
                found.append(value)
            elif type(value).__name__ == "QuantState":
                pending.append(value)
    return found


def _storage_of(tensor: torch.Tensor) -> torch.UntypedStorage | None:
    """The untyped storage behind ``tensor``; None for tensors without one (sparse, nested).

    A DTensor (FSDP2's sharded parameters, gradients and optimizer state) counts its local shard:
    what this rank holds.
    """
    local = getattr(tensor, "_local_tensor", None)
    if isinstance(local, torch.Tensor):
        tensor = local
    try:
        return tensor.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
