"""The data of one run, as every source returns it; apart from the registry (``data/build.py``) so a
source module imports the type without importing the registry that imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset


@dataclass
class DataBundle:
    """The data of one run.

    Attributes:
        train: the training split (augmented when ``augment`` is set).
        val: the validation split, or ``None`` (``val_fraction: 0`` and no ``val/`` folder).
        test: the test split, or ``None``.
        num_classes: classes of a classification task; ``None`` otherwise.
        input_shape: shape of one input sample (``(1, 8, 8)`` for digits); ``None`` for text,
            whose length varies.
        class_names: class names in index order, when known.
        collate_fn: pass to ``DataLoader(collate_fn=...)``; ``None`` means the default collate
            (text samples of varying length need the bundle's one, which pads per batch).
        task: ``"classification"``, ``"regression"``, ``"text-classification"``,
            ``"text-to-image"`` or ``"causal-lm"``.
        metadata: facts worth saving with the run (normalisation statistics, split seed,
            cache use, skipped files).
    """

    train: Dataset
    val: Dataset | None
    test: Dataset | None
    num_classes: int | None
    input_shape: tuple[int, ...] | None
    class_names: list[str] | None
    collate_fn: Callable | None
    task: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        """Number of samples per split (0 for a missing split)."""
        return {
            name: len(split) if split is not None else 0
            for name, split in (("train", self.train), ("val", self.val), ("test", self.test))
        }
