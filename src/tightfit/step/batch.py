"""A batch in any of its forms (tensor, ``(inputs, target)`` pair, tuple, mapping): count, slice,
move and cast it without caring which form it has."""

from collections.abc import Mapping
from typing import Any

import torch


def count_samples(batch: Any) -> int:
    """The number of samples in a batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        return count_samples(next(iter(batch.values())))
    return count_samples(batch[0])


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of a batch, keeping its form (tensor, pair, tuple or mapping)."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return {key: slice_batch(value, start, stop) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(slice_batch(item, start, stop) for item in batch)
    return batch  # a non-tensor field (None target) belongs to every slice


def move_to_device(batch: Any, device: torch.device | str, non_blocking: bool = False, copy: bool = False) -> Any:
    """The batch with every tensor on ``device`` (tensors already there are kept, unless ``copy``)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking, copy=copy)
    if isinstance(batch, Mapping):
        return {key: move_to_device(value, device, non_blocking, copy) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to_device(item, device, non_blocking, copy) for item in batch)
    return batch


def cast_floats(batch: Any, dtype: torch.dtype) -> Any:
    """Floating tensors of a batch in ``dtype`` (bf16-pure feeds bf16 inputs to bf16 weights)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, Mapping):
        return {key: cast_floats(value, dtype) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(cast_floats(value, dtype) for value in batch)
    return batch
