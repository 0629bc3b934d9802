"""Build the train/validation/test data sets a run needs from its ``data:`` config.

:func:`build_datasets` is the one entry point: it dispatches on ``config.source`` and returns a
:class:`DataBundle`. :func:`make_dataloader` wraps a split in a ``DataLoader`` with worker
processes and pinned memory chosen where they help.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader, Dataset

from tightfit.data.bundle import DataBundle
from tightfit.data.config import DataConfig, parse_data_config
from tightfit.errors import ConfigError


def _builder(source: str) -> Callable[[DataConfig, int], DataBundle]:
    # Imported on demand: the csv source should not pay for PIL, nor digits for transformers.
    if source == "digits":
        from tightfit.data.digits import build_digits

        return build_digits
    if source == "tensors":
        from tightfit.data.tensors import build_tensors

        return build_tensors
    if source == "image-folder":
        from tightfit.data.image_folder import build_image_folder

        return build_image_folder
    if source == "csv":
        from tightfit.data.csv_table import build_csv

        return build_csv
    if source == "text-csv":
        from tightfit.data.text import build_text_csv

        return build_text_csv
    if source == "captioned-images":
        from tightfit.data.captions import build_captioned_images

        return build_captioned_images
    if source == "text-corpus":
        from tightfit.data.lm_corpus import build_text_corpus

        return build_text_corpus
    raise ConfigError(f"data.source: unknown source {source!r}")


def build_datasets(config: DataConfig | dict | None = None, *, seed: int = 0) -> DataBundle:
    """Build the data sets described by ``config``.

    Args:
        config: the ``data:`` section (a :class:`DataConfig`, or a dict validated into one;
            ``None`` means the built-in digits).
        seed: the run's seed; it fixes the split and the ``limit`` subset unless ``config.seed``
            is set.

    Returns:
        The :class:`DataBundle`.

    Raises:
        ConfigError: a bad setting (unknown source, missing path, missing column), naming the key.
        DataError: unusable data (a corrupt image, a non-numeric cell), naming the file and place.
        MissingExtraError: a source that needs an extra that is not installed.

    Example:
        >>> bundle = build_datasets({"source": "digits", "limit": 100}, seed=0)
        >>> bundle.sizes()
        {'train': 100, 'val': 100, 'test': 100}
    """
    config = parse_data_config(config)
    return _builder(config.source)(config, seed)


def resolve_num_workers(dataset: Dataset, config: DataConfig) -> int:
    """Worker processes for loading ``dataset``.

    Data already in memory is indexed faster than a worker can pickle it to the main process,
    so it gets none; data decoded from disk gets up to 4 (leaving a core for the training loop).
    """
    if config.num_workers != "auto":
        return config.num_workers
    if getattr(dataset, "in_memory", False):
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cores - 1))


def resolve_pin_memory(config: DataConfig, device_type: str) -> bool:
    """Pinned host memory speeds up host-to-GPU copies; it only exists for CUDA."""
    if config.pin_memory == "auto":
        return device_type == "cuda"
    return bool(config.pin_memory) and device_type == "cuda"


def make_dataloader(
    dataset: Dataset,
    config: DataConfig,
    *,
    batch_size: int,
    device_type: str = "cpu",
    shuffle: bool = False,
    collate_fn: Callable | None = None,
    sampler: Any = None,
    generator: Any = None,
    drop_last: bool = False,
) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` with workers and pinned memory chosen for it.

    Args:
        dataset: one split of a :class:`DataBundle`.
        config: the ``data:`` section (``num_workers``, ``pin_memory``).
        batch_size: samples per (micro-)batch.
        device_type: where batches go (``"cuda"``, ``"mps"``, ``"cpu"``).
        shuffle: shuffle each epoch (ignored when ``sampler`` is given).
        collate_fn: the bundle's ``collate_fn`` (``None``: default collate).
        sampler: e.g. a ``DistributedSampler`` or a resumable sampler.
        generator: a seeded ``torch.Generator`` for reproducible shuffling.
        drop_last: drop a last incomplete batch.

    Returns:
        The loader. Worker processes persist across epochs, so a streamed data set does not
        restart its workers every epoch.
    """
    workers = resolve_num_workers(dataset, config)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        pin_memory=resolve_pin_memory(config, device_type),
        persistent_workers=workers > 0,
        collate_fn=collate_fn,
        generator=generator,
        drop_last=drop_last,
    )
