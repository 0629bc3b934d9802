"""The samples of a study: digits, or a folder of volumes (NIfTI through nibabel, or .npy).

Every sample has a stable id (``digits-0042``, ``tumour/case-7.nii.gz``) and a label. The samples
are split once, stratified with the study's seed, into a *development* part (what ``pretrain`` and
``train`` stages learn from) and an *evaluation* part (features are extracted from it and the
classifiers cross-validated on it), so no arm has seen the labels it is evaluated on.

A volumes folder holds one sub-folder per class::

    volumes/
      healthy/case-001.nii.gz   case-002.npy ...
      tumour/case-101.nii ...

Every volume must have the same shape (resample beforehand); a volume is read as a float32 tensor
``1 x D x H x W`` (a 4D NIfTI's last axis, or a .npy's first, is the channel axis).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from tightfit._optional import require
from tightfit.data.digits import DIGITS_PIXEL_MAX
from tightfit.errors import ConfigError
from tightfit.study.spec import StudyData

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".npy")


@dataclass
class StudySamples:
    """Every sample of a study, the split, and a dataset that reads sample ``i`` as a tensor."""

    dataset: Dataset
    labels: np.ndarray
    ids: list[str]
    class_names: list[str]
    development: np.ndarray  # indices into the samples
    evaluation: np.ndarray

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.dataset[0].shape)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class _TensorSamples(Dataset):
    in_memory = True  # the trainer's loaders use no worker processes for it

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


class VolumeFolder(Dataset):
    """Volumes read from files on each access (a study's volumes need not fit in memory)."""

    in_memory = False  # decoded per item: loader workers help

    def __init__(self, files: list[Path]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return read_volume(self.files[index])


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def read_volume(path: Path) -> torch.Tensor:
    """One volume as a float32 tensor ``C x D x H x W``.

    Raises:
        ConfigError: the file is not a readable volume, or not a 3D or 4D array (naming the file).
    """
    path = Path(path)
    if path.name.endswith(".npy"):
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, EOFError, ValueError) as error:
            raise ConfigError(f"data: {path} is not a readable .npy array ({_first_line(error)})") from None
        channels_last = False
    else:
        nibabel = require("nibabel", extra="medical", purpose=f"reading the NIfTI volume {path}")
        try:
            array = np.asarray(nibabel.load(str(path)).dataobj)
        except (nibabel.filebasedimages.ImageFileError, OSError, EOFError, ValueError, zlib.error) as error:
            raise ConfigError(f"data: {path} is not a readable NIfTI volume ({_first_line(error)})") from None
        channels_last = True
    if array.ndim == 3:
        array = array[None]
    elif array.ndim == 4 and channels_last:
        array = np.moveaxis(array, -1, 0)
    elif array.ndim != 4:
        raise ConfigError(f"data: {path} holds a {array.ndim}D array; a volume is 3D (or 4D with channels)")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def load_samples(config: StudyData, seed: int) -> StudySamples:
    """Build the study's samples and split them (see the module doc).

    Raises:
        ConfigError: a missing or empty folder, unequal volume shapes, a class too small to split.
    """
    if config.source == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.float32)[:, None] / DIGITS_PIXEL_MAX)
        dataset: Dataset = _TensorSamples(images)
        labels = digits.target.astype(np.int64)
        ids = [f"digits-{index:04d}" for index in range(len(labels))]
        class_names = [str(name) for name in digits.target_names]
    else:
        dataset, labels, ids, class_names = _volume_folder(Path(config.path))
    keep = np.arange(len(labels))
    if config.limit is not None and config.limit < len(labels):
        keep = _stratified_subset(labels, config.limit, seed)
    development, evaluation = _split(labels, keep, config.development_fraction, seed)
    return StudySamples(dataset, labels, ids, class_names, development, evaluation)


def count_samples(config: StudyData) -> int | None:
    """How many samples the study will use, without reading them (None when the folder is not there)."""
    if config.source == "digits":
        total = 1797  # sklearn's bundled digits
    else:
        root = Path(config.path)
        if not root.is_dir():
            return None
        total = sum(1 for path in root.glob("*/*") if path.name.endswith(VOLUME_SUFFIXES))
    return min(total, config.limit) if config.limit else total


def _volume_folder(root: Path):
    if not root.is_dir():
        raise ConfigError(f"data.path: {root} is not a folder")
    class_names = sorted(child.name for child in root.iterdir() if child.is_dir())
    files, labels = [], []
    for label, name in enumerate(class_names):
        found = sorted(path for path in (root / name).iterdir() if path.name.endswith(VOLUME_SUFFIXES))
        files += found
        labels += [label] * len(found)
    if len(class_names) < 2 or not files:
        raise ConfigError(f"data.path: {root} needs one sub-folder of volumes (.nii, .nii.gz, .npy) per class, at least two")
    dataset = VolumeFolder(files)
    first = tuple(dataset[0].shape)
    for path in files[1:]:
        shape = tuple(read_volume(path).shape)
        if shape != first:
            raise ConfigError(f"data: {path} has shape {shape}, {files[0]} has {first}; resample the volumes to one shape")
    ids = [str(path.relative_to(root)) for path in files]
    return dataset, np.asarray(labels, dtype=np.int64), ids, class_names


def _stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    from sklearn.model_selection import train_test_split

    subset, _ = train_test_split(np.arange(len(labels)), train_size=size, stratify=labels, random_state=seed)
    return np.sort(subset)


def _split(labels: np.ndarray, keep: np.ndarray, development_fraction: float, seed: int):
    if development_fraction == 0:
        return np.array([], dtype=np.int64), keep
    from sklearn.model_selection import train_test_split

    try:
        development, evaluation = train_test_split(
            keep, train_size=development_fraction, stratify=labels[keep], random_state=seed
        )
    except ValueError as error:
        raise ConfigError(f"data.development_fraction: cannot split {len(keep)} samples stratified ({error})") from None
    return np.sort(development), np.sort(evaluation)
