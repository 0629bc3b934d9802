"""Deterministic train/validation/test splits by fraction, stratified by class, and ``limit``.

Everything here works on index arrays, so a split is cheap whatever the samples are (decoded
arrays in memory or file paths streamed from disk), and the same seed gives the same split on
every machine: the permutation comes from NumPy's PCG64 generator, not from global state.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _take_counts(total: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """How many of ``total`` go to validation and test (at least one each when asked for)."""
    val_count = int(round(total * val_fraction))
    test_count = int(round(total * test_fraction))
    # A fraction that rounds to zero on a small class would silently drop that class from the
    # split; when there are enough samples, give it one.
    if val_fraction > 0 and val_count == 0 and total >= 3:
        val_count = 1
    if test_fraction > 0 and test_count == 0 and total >= 3:
        test_count = 1
    while val_count + test_count >= total and (val_count or test_count):
        # Always leave at least one sample to train on.
        if test_count >= val_count and test_count:
            test_count -= 1
        else:
            val_count -= 1
    return val_count, test_count


def split_indices(
    count: int,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    labels: Sequence[int] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split ``range(count)`` into disjoint train, validation and test index arrays.

    Args:
        count: number of samples.
        val_fraction: share for validation, in ``[0, 1)``.
        test_fraction: share for test, in ``[0, 1)``.
        seed: the split is a function of ``seed`` (and the labels) only.
        labels: class index per sample; when given, each class is split separately so the three
            splits keep the class proportions (stratification).

    Returns:
        ``(train, val, test)``: sorted int64 index arrays that together cover ``range(count)``.

    Example:
        >>> train, val, test = split_indices(100, val_fraction=0.1, test_fraction=0.2, seed=0)
        >>> len(train), len(val), len(test)
        (70, 10, 20)
    """
    rng = np.random.default_rng(seed)
    if labels is None:
        groups = [np.arange(count)]
    else:
        labels = np.asarray(labels)
        if len(labels) != count:
            raise ValueError(f"{len(labels)} labels for {count} samples")
        groups = [np.flatnonzero(labels == value) for value in np.unique(labels)]
    train, val, test = [], [], []
    for group in groups:
        shuffled = rng.permutation(group)
        val_count, test_count = _take_counts(len(group), val_fraction, test_fraction)
        val.append(shuffled[:val_count])
        test.append(shuffled[val_count : val_count + test_count])
        train.append(shuffled[val_count + test_count :])
    return tuple(np.sort(np.concatenate(part)).astype(np.int64) for part in (train, val, test))


def limit_indices(indices: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """A seeded random subset of at most ``limit`` of ``indices`` (all of them when ``None``).

    The subset is sorted, so a limited run reads files in the same order as a full one.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if limit is None or len(indices) <= limit:
        return indices
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(indices, size=limit, replace=False))
