"""The samples of a study: digits, a folder of volumes per class (NIfTI or .npy), or the subject
folders of a ``medical`` (NIfTI / DICOM volumes) or ``images`` (2D files) source with a label CSV
(:mod:`tightfit.study.medical`, preprocessed by MONAI).

Every sample has a stable id (``digits-0042``, ``tumour/case-7.nii.gz``, ``BraTS-007``), a label
and a *group*: the subject it belongs to (or the CSV's ``group``). Several samples of one group
(the 2D images of one patient) always fall on the same side of every split. The samples are split
once, stratified by label and grouped, with the study's seed, into a *development* part (what
``pretrain`` and ``train`` stages learn from) and an *evaluation* part (features are extracted
from it and the classifiers cross-validated on it), so no arm has seen the labels it is evaluated
on, nor another image of the same subject.

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
    groups: np.ndarray  # per sample, the subject (or CSV group) cross-validation keeps together

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


def load_samples(config: StudyData, seed: int, *, cache_dir: Path | None = None) -> StudySamples:
    """Build the study's samples and split them (see the module doc).

    Args:
        config: the study's ``data:``.
        seed: the split's seed.
        cache_dir: where ``medical``/``images`` samples are cached once preprocessed (None: memory).

    Raises:
        ConfigError: a missing or empty folder, unequal volume shapes, a class too small to split,
            and every bad input :mod:`tightfit.study.medical` names.
    """
    if config.source == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.float32)[:, None] / DIGITS_PIXEL_MAX)
        dataset: Dataset = _TensorSamples(images)
        labels = digits.target.astype(np.int64)
        ids = [f"digits-{index:04d}" for index in range(len(labels))]
        class_names = [str(name) for name in digits.target_names]
        groups = np.asarray(ids)
    elif config.source == "volumes":
        dataset, labels, ids, class_names = _volume_folder(Path(config.path))
        groups = np.asarray(ids)
    else:
        dataset, labels, ids, class_names, groups = _subject_source(config, cache_dir)
    keep = np.arange(len(labels))
    if config.limit is not None and config.limit < len(labels):
        keep = _stratified_subset(labels, groups, config.limit, seed)
    development, evaluation = _split(labels, groups, keep, config.development_fraction, seed)
    return StudySamples(dataset, labels, ids, class_names, development, evaluation, groups)


def count_samples(config: StudyData) -> int | None:
    """How many samples the study will use, without reading them (None when the folder is not there)."""
    if config.source == "digits":
        total = 1797  # sklearn's bundled digits
    else:
        root = Path(config.path)
        if not root.is_dir():
            return None
        if config.source == "volumes":
            total = sum(1 for path in root.glob("*/*") if path.name.endswith(VOLUME_SUFFIXES))
        elif config.source == "medical":
            total = sum(1 for path in root.iterdir() if path.is_dir())
        else:
            from tightfit.study.medical import IMAGE_SUFFIXES

            total = sum(1 for path in root.glob("*/*") if path.suffix.lower() in IMAGE_SUFFIXES)
    return min(total, config.limit) if config.limit else total


def _subject_source(config: StudyData, cache_dir: Path | None):
    from tightfit.study.medical import PreprocessedSamples, index_images, index_volumes

    root, labels_path = Path(config.path), Path(config.labels)
    if config.source == "medical":
        ids, entries, table = index_volumes(root, labels_path, config.modalities)
        subjects = ids
    else:
        ids, entries, table = index_images(root, labels_path)
        subjects = [sample.split("/")[0] for sample in ids]
    class_names = sorted({table.labels[subject] for subject in subjects})
    if len(class_names) < 2:
        raise ConfigError(f"data.labels: {labels_path} gives the subjects of {root} only one label ({class_names})")
    labels = np.asarray([class_names.index(table.labels[subject]) for subject in subjects], dtype=np.int64)
    groups = np.asarray([table.groups[subject] for subject in subjects])
    dataset = PreprocessedSamples(
        entries,
        config.preprocess.model_dump(mode="json"),
        cache_dir,
        spatial_dims=3 if config.source == "medical" else 2,
    )
    return dataset, labels, ids, class_names, groups


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
        raise ConfigError(
            f"data.path: {root} needs one sub-folder of volumes (.nii, .nii.gz, .npy) per class, at least two"
        )
    dataset = VolumeFolder(files)
    first = tuple(dataset[0].shape)
    for path in files[1:]:
        shape = tuple(read_volume(path).shape)
        if shape != first:
            raise ConfigError(
                f"data: {path} has shape {shape}, {files[0]} has {first}; resample the volumes to one shape"
            )
    ids = [str(path.relative_to(root)) for path in files]
    return dataset, np.asarray(labels, dtype=np.int64), ids, class_names


def _group_labels(labels: np.ndarray, groups: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first sample of every group in ``keep`` (in order) and that group's label, to split whole groups."""
    _, first = np.unique(groups[keep], return_index=True)
    first = keep[np.sort(first)]
    return first, labels[first]


def _expand(chosen_first: np.ndarray, groups: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Every sample of ``keep`` whose group is one of the groups of ``chosen_first``."""
    return np.sort(keep[np.isin(groups[keep], groups[chosen_first])])


def _stratified_subset(labels: np.ndarray, groups: np.ndarray, size: int, seed: int) -> np.ndarray:
    from sklearn.model_selection import train_test_split

    keep = np.arange(len(labels))
    first, group_labels = _group_labels(labels, groups, keep)
    if size >= len(first):
        return keep
    subset, _ = train_test_split(first, train_size=size, stratify=group_labels, random_state=seed)
    return _expand(subset, groups, keep)


def _split(labels: np.ndarray, groups: np.ndarray, keep: np.ndarray, development_fraction: float, seed: int):
    """Development and evaluation parts, stratified by label, whole groups on one side (module doc)."""
    if development_fraction == 0:
        return np.array([], dtype=np.int64), keep
    from sklearn.model_selection import train_test_split

    first, group_labels = _group_labels(labels, groups, keep)
    try:
        development, _ = train_test_split(
            first, train_size=development_fraction, stratify=group_labels, random_state=seed
        )
    except ValueError as error:
        raise ConfigError(
            f"data.development_fraction: cannot split {len(first)} subjects stratified ({error})"
        ) from None
    development = _expand(development, groups, keep)
    return development, np.setdiff1d(keep, development)
