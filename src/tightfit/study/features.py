"""Feature shards: what extract and sparse-code stages write and classify stages read.

A stage's ``features/`` folder holds ``shard-00000.safetensors``, ``shard-00001.safetensors``...
in sample order, each with a ``features`` matrix (float32, one row per sample), the ``labels`` and
the ``sample_index`` (position in the study's samples); the sample ids are in the shard's metadata.
A shard is written under a temporary name and renamed into place, so a killed process leaves only
complete shards: ``--resume`` continues after the last one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHARD_PATTERN = "shard-*.safetensors"


@dataclass
class FeatureSet:
    """Every sample's feature vector, label and id, in sample order."""

    features: np.ndarray
    labels: np.ndarray
    sample_index: np.ndarray
    ids: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def write_shard(
    folder: Path, number: int, features: np.ndarray, labels: np.ndarray, sample_index: np.ndarray, ids: list[str]
) -> Path:
    """Write one shard atomically; returns its path."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"shard-{number:05d}.safetensors"
    temporary = folder / f".shard-{number:05d}.tmp"
    save_file(
        {
            "features": np.ascontiguousarray(features, dtype=np.float32),
            "labels": np.ascontiguousarray(labels, dtype=np.int64),
            "sample_index": np.ascontiguousarray(sample_index, dtype=np.int64),
        },
        str(temporary),
        metadata={"ids": json.dumps(list(ids))},
    )
    os.replace(temporary, path)
    return path


def shards(folder: Path) -> list[Path]:
    """The complete shards of a folder, in order."""
    return sorted(Path(folder).glob(SHARD_PATTERN))


def samples_written(folder: Path) -> int:
    """How many samples the complete shards of ``folder`` hold."""
    from safetensors import safe_open

    total = 0
    for path in shards(folder):
        with safe_open(str(path), framework="numpy") as shard:
            total += shard.get_slice("labels").get_shape()[0]
    return total


def read_features(folder: Path) -> FeatureSet:
    """Concatenate every shard of ``folder``.

    Raises:
        FileNotFoundError: the folder has no shard.
    """
    from safetensors import safe_open

    parts = {"features": [], "labels": [], "sample_index": []}
    ids: list[str] = []
    found = shards(folder)
    if not found:
        raise FileNotFoundError(f"no feature shards in {folder}")
    for path in found:
        with safe_open(str(path), framework="numpy") as shard:
            for key in parts:
                parts[key].append(shard.get_tensor(key))
            ids += json.loads(shard.metadata()["ids"])
    return FeatureSet(*(np.concatenate(parts[key]) for key in ("features", "labels", "sample_index")), ids)
