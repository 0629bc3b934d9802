"""In-memory data: NumPy arrays or tensors, from Python or from ``.npz``/``.pt``/``.safetensors`` files.

This module also holds what every in-memory source (digits, csv, tensors) shares: the
:class:`ArrayDataset` and :func:`bundle_from_arrays`, which splits, limits, normalises (fitted on
the training split only) and wraps the arrays.

Files are loaded only through formats that cannot run code: ``np.load(allow_pickle=False)``,
``torch.load(weights_only=True)`` and safetensors.
"""

from __future__ import annotations

import pickle  # only for its error class: files are never unpickled beyond torch's weights-only loader
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from tightfit.data.config import DataConfig, DataError
from tightfit.data.splits import limit_indices, split_indices
from tightfit.errors import ConfigError

TENSOR_FILE_SUFFIXES = (".npz", ".pt", ".pth", ".safetensors")


class ArrayDataset(Dataset):
    """Samples ``(inputs[i], targets[i])`` from tensors held in memory.

    Args:
        inputs: float tensor ``(N, ...)``.
        targets: ``(N,)`` int64 class indices or ``(N, k)`` float regression targets.
        transform: applied to each input as it is read (training augmentation), or ``None``.
    """

    in_memory = True  # DataLoader helpers use no worker processes for data already in memory

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, transform: Callable | None = None):
        if len(inputs) != len(targets):
            raise DataError(f"{len(inputs)} inputs but {len(targets)} targets")
        self.inputs = inputs
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.inputs[index]
        if self.transform is not None:
            sample = self.transform(sample)
        return sample, self.targets[index]


def _as_tensor(array: Any, name: str) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu()
    try:
        return torch.from_numpy(np.ascontiguousarray(np.asarray(array)))
    except TypeError as error:
        raise DataError(f"{name}: cannot turn {type(array).__name__} into a tensor ({error})") from None


def _resolve_task(targets: torch.Tensor, task: str) -> str:
    if task != "auto":
        return task
    return "regression" if targets.is_floating_point() else "classification"


def _standardise(inputs: torch.Tensor, train: np.ndarray) -> tuple[torch.Tensor, dict]:
    """Zero mean, unit variance with statistics of the training rows only.

    Tabular data ``(N, F)`` gets one mean per feature; images ``(N, C, H, W)`` one per channel.
    """
    reduce_dims = (0,) if inputs.ndim == 2 else tuple(d for d in range(inputs.ndim) if d != 1)
    train_rows = inputs[torch.as_tensor(train)].double()
    mean = train_rows.mean(dim=reduce_dims, keepdim=True)
    std = train_rows.std(dim=reduce_dims, keepdim=True, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant feature stays at zero
    standardised = ((inputs.double() - mean) / std).float()
    stats = {"mean": mean.squeeze(0).flatten().tolist(), "std": std.squeeze(0).flatten().tolist()}
    return standardised, stats


def bundle_from_arrays(
    inputs: Any,
    targets: Any,
    config: DataConfig,
    seed: int,
    *,
    class_names: list[str] | None = None,
    normalize: str = "none",
    source: str = "tensors",
    splits: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    metadata: dict | None = None,
):
    """Split, limit, normalise and wrap in-memory arrays into a :class:`~tightfit.data.build.DataBundle`.

    Args:
        inputs: array-like ``(N, ...)``; integer pixels (uint8) are scaled to ``[0, 1]`` by
            ``normalize="unit"``.
        targets: array-like ``(N,)`` class indices, or floats for regression.
        config: split fractions, stratification, limit, augmentation.
        seed: split seed (``config.seed`` wins when set).
        class_names: names of the classes, index order.
        normalize: ``"none"``, ``"unit"`` (divide by 255 for uint8, by the maximum for other
            integer inputs) or ``"standard"`` (fitted on train).
        source: the source name, for the bundle's metadata.
        splits: ``(train, val, test)`` indices already drawn (by a source that fits something
            on the training rows before this); default: drawn here from ``config``.
        metadata: extra facts to keep in the bundle's metadata.

    Returns:
        The bundle; ``val``/``test`` are ``None`` when their fraction is zero.

    Raises:
        DataError: mismatched lengths, negative class indices.
    """
    from tightfit.data.bundle import DataBundle
    from tightfit.data.transforms import build_augmentation

    inputs = _as_tensor(inputs, "inputs")
    targets = _as_tensor(targets, "targets")
    if len(inputs) != len(targets):
        raise DataError(f"{source}: {len(inputs)} inputs but {len(targets)} targets")
    if len(inputs) == 0:
        raise DataError(f"{source}: no samples")
    task = _resolve_task(targets, config.task)
    if task == "classification":
        if targets.is_floating_point():
            if not torch.equal(targets, targets.round()):
                raise DataError(f"{source}: task is classification but the targets are not whole numbers")
        targets = targets.long().reshape(-1)
        if targets.min() < 0:
            raise DataError(f"{source}: class indices must be 0 or more, found {int(targets.min())}")
        num_classes = len(class_names) if class_names else int(targets.max()) + 1
    else:
        targets = targets.float()
        # The task loss uses MSE when target and prediction have the same shape; a model
        # predicting one value outputs (batch, 1), so a flat target becomes (N, 1).
        if targets.ndim == 1:
            targets = targets.unsqueeze(1)
        num_classes = None

    split_seed = config.seed if config.seed is not None else seed
    stratify_labels = targets.numpy() if (task == "classification" and config.stratify) else None
    train, val, test = (
        splits
        if splits is not None
        else split_indices(
            len(inputs),
            val_fraction=config.val_fraction,
            test_fraction=config.test_fraction,
            seed=split_seed,
            labels=stratify_labels,
        )
    )

    stats: dict = {}
    if normalize == "unit" and not inputs.is_floating_point():
        scale = 255.0 if inputs.dtype == torch.uint8 else float(inputs.max().clamp(min=1))
        inputs = inputs.float() / scale
        stats = {"scale": scale}
    elif normalize == "standard":
        inputs, stats = _standardise(inputs.float(), train)
    else:
        inputs = inputs.float()

    augmentation = None
    if config.augment:
        if inputs.ndim < 3:
            raise ConfigError(
                f"data.augment: {config.augment} needs image inputs (channels, height, width); "
                f"these samples have shape {tuple(inputs.shape[1:])}"
            )
        augmentation = build_augmentation(config.augment, tuple(inputs.shape[-2:]))

    def make(indices: np.ndarray, transform: Callable | None) -> ArrayDataset | None:
        if len(indices) == 0:
            return None
        chosen = torch.as_tensor(limit_indices(indices, config.limit, split_seed))
        return ArrayDataset(inputs[chosen], targets[chosen], transform)

    train_set = make(train, augmentation)
    if train_set is None:
        raise DataError(f"{source}: the training split is empty")
    return DataBundle(
        train=train_set,
        val=make(val, None),
        test=make(test, None),
        num_classes=num_classes,
        input_shape=tuple(inputs.shape[1:]),
        class_names=class_names,
        collate_fn=None,
        task=task,
        metadata={
            "source": source,
            "normalization": {"mode": normalize, **stats},
            "split_seed": split_seed,
            **(metadata or {}),
        },
    )


def from_arrays(inputs: Any, targets: Any, config: DataConfig | dict | None = None, *, seed: int = 0):
    """Build a :class:`~tightfit.data.build.DataBundle` from arrays or tensors held in Python.

    Args:
        inputs: NumPy array or tensor ``(N, ...)``.
        targets: ``(N,)`` integer class indices, or floats for regression.
        config: split, limit and augmentation settings (``source`` and ``path`` are ignored);
            a dict is validated like the ``data:`` section.
        seed: split seed.

    Returns:
        The bundle, split by fraction (stratified for classification).

    Example:
        >>> import numpy as np
        >>> bundle = from_arrays(np.random.rand(100, 4), np.arange(100) % 2)
        >>> bundle.num_classes, bundle.input_shape
        (2, (4,))
    """
    from tightfit.data.config import parse_data_config

    config = parse_data_config(config)
    inputs = _as_tensor(inputs, "inputs")
    return bundle_from_arrays(
        inputs, targets, config, seed, normalize=_normalize_mode(inputs, config), source="tensors"
    )


def load_tensor_file(path: Path, inputs_key: str, targets_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the inputs and targets arrays of an ``.npz``, ``.pt`` or ``.safetensors`` file safely.

    Raises:
        ConfigError: unsupported suffix, or a key that is not in the file (naming those that are).
        DataError: a file that cannot be read as its format.
    """
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                arrays = {key: torch.from_numpy(archive[key]) for key in archive.files}
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            arrays = load_file(str(path))
        elif suffix in (".pt", ".pth"):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(loaded, (tuple, list)) and len(loaded) == 2:
                loaded = {inputs_key: loaded[0], targets_key: loaded[1]}
            if not isinstance(loaded, dict):
                raise DataError(
                    f"{path}: expected a dict of tensors or an (inputs, targets) pair, found {type(loaded).__name__}"
                )
            arrays = loaded
        else:
            raise ConfigError(f"data.path: {path} is not a tensors file; use one of {', '.join(TENSOR_FILE_SUFFIXES)}")
    except pickle.UnpicklingError:
        raise DataError(
            f"{path}: holds Python objects besides tensors, which only an unsafe (pickle) load could "
            "read; save a dict of plain tensors, or use .npz/.safetensors"
        ) from None
    except (OSError, ValueError, RuntimeError) as error:
        raise DataError(f"{path}: cannot read as {suffix} ({error})") from None
    for key, field in ((inputs_key, "inputs"), (targets_key, "target")):
        if key not in arrays:
            raise ConfigError(
                f"data.columns.{field}: no array {key!r} in {path} (it holds: {', '.join(sorted(arrays))})"
            )
    return arrays[inputs_key], arrays[targets_key]


def build_tensors(config: DataConfig, seed: int):
    """The ``tensors`` source: a file of ``inputs``/``targets`` arrays."""
    if config.path is None:
        raise ConfigError(
            "data.path: the tensors source needs a .npz/.pt/.safetensors file "
            "(in Python, use tightfit.data.from_arrays for arrays in memory)"
        )
    path = Path(config.path).expanduser()
    if not path.is_file():
        raise ConfigError(f"data.path: no such file {path}")
    inputs, targets = load_tensor_file(path, config.columns.inputs or "inputs", config.columns.target or "targets")
    return bundle_from_arrays(
        inputs, targets, config, seed, normalize=_normalize_mode(inputs, config), source="tensors"
    )


def _normalize_mode(inputs: torch.Tensor, config: DataConfig) -> str:
    """``auto`` scales uint8 pixels to [0, 1] and leaves anything else as given."""
    if config.normalize != "auto":
        return config.normalize
    return "unit" if inputs.dtype == torch.uint8 else "none"
