"""Medical image sources of a study: NIfTI / DICOM volumes and 2D image files, labelled by a CSV.

Two layouts, both with one folder per subject under ``data.path`` and a label CSV
(``subject,label[,group]``; ``group`` is the unit cross-validation keeps together, the subject
by default)::

    data: {source: medical, path: brats/, labels: brats/labels.csv,
           modalities: ["*_t1.nii.gz", "*_t1ce.nii.gz", "*_t2.nii.gz", "*_flair.nii.gz"],
           preprocess: {orientation: RAS, spacing: [2, 2, 2], clip_percentiles: [0.5, 99.5],
                        zscore: true, crop_foreground: true, shape: [64, 64, 64]}}

    data: {source: images, path: slices/, labels: slices/labels.csv}   # SUBJECT/*.png|jpg|dcm

``medical``: each modality pattern must match one entry per subject folder: a ``.nii``/``.nii.gz``
file (a 3D volume) or a folder of DICOM files (one series, sorted by position by MONAI's
``PydicomReader``). The modalities become the channels of one ``C x D x H x W`` sample per
subject. ``images``: every image file of a subject folder is a sample of that subject.

Preprocessing is MONAI's own dictionary transforms, composed in this order from the study file:
``LoadImaged`` -> ``Orientationd`` -> ``Spacingd`` -> ``ConcatItemsd`` ->
``ScaleIntensityRangePercentilesd`` (clip, per channel) -> ``NormalizeIntensityd(nonzero,
channel_wise)`` -> ``CropForegroundd`` -> ``ResizeWithPadOrCropd``. A preprocessed sample is cached
(:class:`~tightfit.data.cache.TensorCache`, namespace ``medical``) under the SHA-256 of its input
files *and* the preprocessing settings and MONAI's version: MONAI's ``PersistentDataset`` keys on
the file names only and does not notice a changed transform; this cache does.

Everything that can be wrong with the inputs (a subject missing from the CSV, mixed modality
counts, a DICOM folder holding two series, a 4D NIfTI, a file that is not NIfTI) is found when the
samples are indexed, before any stage runs, as one :class:`~tightfit.errors.ConfigError` line.
"""

from __future__ import annotations

import csv
import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from tightfit._optional import require
from tightfit.errors import ConfigError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")
CACHE_NAMESPACE = "medical"


@dataclass
class LabelTable:
    """The label CSV: subject -> label name, subject -> group."""

    labels: dict[str, str]
    groups: dict[str, str]


def read_label_csv(path: Path) -> LabelTable:
    """Read ``subject,label[,group]`` (a header row with those names).

    Raises:
        ConfigError: a missing file, missing columns, a subject listed twice.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data.labels: {path} does not exist")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        if "subject" not in columns or "label" not in columns:
            raise ConfigError(f"data.labels: {path} needs a header with columns subject,label[,group]; got {columns}")
        labels: dict[str, str] = {}
        groups: dict[str, str] = {}
        for line, row in enumerate(reader, start=2):
            subject = (row["subject"] or "").strip()
            if subject in labels:
                raise ConfigError(f"data.labels: {path} line {line}: subject {subject!r} listed twice")
            labels[subject] = (row["label"] or "").strip()
            groups[subject] = (row.get("group") or "").strip() or subject
    if not labels:
        raise ConfigError(f"data.labels: {path} lists no subject")
    return LabelTable(labels, groups)


def subject_folders(root: Path, table: LabelTable, labels_path: Path) -> list[Path]:
    """The subject folders of ``root``, each checked against the CSV (in both directions)."""
    if not root.is_dir():
        raise ConfigError(f"data.path: {root} is not a folder")
    folders = sorted(child for child in root.iterdir() if child.is_dir() and not child.name.startswith("."))
    for folder in folders:
        if folder.name not in table.labels:
            raise ConfigError(f"data.labels: subject {folder.name!r} (folder {folder}) is missing from {labels_path}")
    present = {folder.name for folder in folders}
    missing = sorted(set(table.labels) - present)
    if missing:
        raise ConfigError(f"data.path: {labels_path} lists subject {missing[0]!r}, which has no folder in {root}")
    return folders


# ------------------------------------------------------------------------------------ volumes
def match_modalities(folder: Path, patterns: list[str]) -> list[Path]:
    """The entry of ``folder`` each modality pattern names (one per pattern, in pattern order).

    Raises:
        ConfigError: a pattern matching nothing or several entries (mixed modality counts).
    """
    entries = sorted(entry for entry in folder.iterdir() if not entry.name.startswith("."))
    chosen = []
    for pattern in patterns:
        found = [entry for entry in entries if fnmatch.fnmatch(entry.name, pattern)]
        if len(found) != 1:
            what = "no entry" if not found else f"{len(found)} entries ({', '.join(entry.name for entry in found[:3])})"
            raise ConfigError(
                f"data.modalities: subject {folder.name!r}: {what} matching {pattern!r}; every subject needs exactly "
                f"one per modality ({len(patterns)}: {', '.join(patterns)})"
            )
        chosen.append(found[0])
    return chosen


def check_nifti(path: Path) -> None:
    """A readable 3D NIfTI (header only), or one line saying what it is."""
    nibabel = require("nibabel", extra="medical", purpose=f"reading the NIfTI volume {path}")
    from nibabel.filebasedimages import ImageFileError

    if not path.name.endswith(NIFTI_SUFFIXES):
        raise ConfigError(f"data: {path} is neither a NIfTI file (.nii, .nii.gz) nor a DICOM folder")
    try:
        shape = nibabel.load(str(path)).shape
    except (ImageFileError, OSError, EOFError, ValueError) as error:
        raise ConfigError(f"data: {path} is not a readable NIfTI file ({str(error).splitlines()[0][:120]})") from None
    spatial = [side for side in shape[3:] if side != 1]
    if len(shape) < 3 or spatial:
        raise ConfigError(
            f"data: {path} holds a {len(shape)}D image of shape {tuple(shape)}; each modality must be "
            "one 3D volume (split a 4D file into one file per modality)"
        )


def check_dicom_series(folder: Path) -> None:
    """A folder of DICOM files holding exactly one series (headers only)."""
    pydicom = require("pydicom", extra="medical", purpose=f"reading the DICOM series {folder}")
    from pydicom.errors import InvalidDicomError

    files = sorted(path for path in folder.iterdir() if path.is_file() and not path.name.startswith("."))
    if not files:
        raise ConfigError(f"data: DICOM folder {folder} holds no file")
    series: dict[str, int] = {}
    for path in files:
        try:
            header = pydicom.dcmread(str(path), stop_before_pixels=True)
        except (InvalidDicomError, OSError) as error:
            raise ConfigError(f"data: {path} is not a DICOM file ({error})") from None
        uid = str(getattr(header, "SeriesInstanceUID", "?"))
        series[uid] = series.get(uid, 0) + 1
    if len(series) > 1:
        counts = ", ".join(f"{uid[-12:]}: {count} files" for uid, count in series.items())
        raise ConfigError(
            f"data: DICOM folder {folder} holds {len(series)} series ({counts}); put each series in its "
            "own folder and name one per modality"
        )


def preprocess_transforms(settings: dict[str, Any], keys: list[str], *, spatial_dims: int = 3):
    """The MONAI ``Compose`` for ``data.preprocess`` (module doc), producing ``image`` from ``keys``.

    Args:
        settings: ``StudyData.preprocess`` as a dict.
        keys: one dictionary key per modality, already loaded (``LoadImaged`` runs separately so
            that its reader can differ per entry: NIfTI file or DICOM folder).
        spatial_dims: 3 for volumes, 2 for image files (no orientation or spacing there).
    """
    require("monai", extra="medical", purpose="preprocessing medical images")
    from monai.transforms import (
        Compose,
        ConcatItemsd,
        CropForegroundd,
        NormalizeIntensityd,
        Orientationd,
        ResizeWithPadOrCropd,
        ScaleIntensityRangePercentilesd,
        Spacingd,
    )

    steps: list[Any] = []
    if spatial_dims == 3 and settings.get("orientation"):
        steps.append(Orientationd(keys=keys, axcodes=settings["orientation"], labels=None))
    if spatial_dims == 3 and settings.get("spacing"):
        steps.append(Spacingd(keys=keys, pixdim=tuple(settings["spacing"]), mode="bilinear"))
    steps.append(ConcatItemsd(keys=keys, name="image", dim=0))
    if settings.get("clip_percentiles"):
        lower, upper = settings["clip_percentiles"]
        steps.append(
            ScaleIntensityRangePercentilesd(
                keys="image", lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True, channel_wise=True
            )
        )
    if settings.get("zscore"):
        steps.append(NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True))
    if settings.get("crop_foreground"):
        steps.append(CropForegroundd(keys="image", source_key="image", allow_smaller=True))
    if settings.get("shape"):
        steps.append(ResizeWithPadOrCropd(keys="image", spatial_size=tuple(settings["shape"])))
    return Compose(steps)


def _loader(reader: str):
    """MONAI's ``LoadImaged`` for one reader, built once: building one instantiates every reader MONAI knows,
    and its GPU DICOM decoder (nvImageCodec, absent on CPU) warns twice each time; we ask for the plain ones."""
    if reader not in _LOADERS:
        import logging
        import warnings

        from monai.transforms import LoadImaged

        plugin_logger = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
        level = plugin_logger.level
        plugin_logger.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
                _LOADERS[reader] = LoadImaged(keys="entry", reader=reader, ensure_channel_first=True, image_only=True)
        finally:
            plugin_logger.setLevel(level)
    return _LOADERS[reader]


_LOADERS: dict[str, Any] = {}


def load_entries(entries: list[Path]) -> dict[str, Any]:
    """``LoadImaged`` of each entry (NIfTI file, DICOM folder or 2D image) as ``modality<i>``, channel first."""
    require("monai", extra="medical", purpose="reading medical images")
    data: dict[str, Any] = {}
    for number, entry in enumerate(entries):
        if entry.is_dir() or entry.suffix.lower() == ".dcm":
            reader = "PydicomReader"
        elif entry.name.endswith(NIFTI_SUFFIXES):
            reader = "NibabelReader"
        else:
            reader = "PILReader"
        data[f"modality{number}"] = _loader(reader)({"entry": str(entry)})["entry"]
    return data


class PreprocessedSamples(Dataset):
    """Samples read through MONAI's transforms, cached on disk (see the module doc).

    Args:
        entries: per sample, the files (or DICOM folders) that are its channels.
        settings: the ``preprocess`` settings (part of every cache key).
        cache_dir: cache root; None keeps preprocessed samples in memory only.
        spatial_dims: 3 (volumes) or 2 (image files).
    """

    in_memory = False

    def __init__(self, entries: list[list[Path]], settings: dict[str, Any], cache_dir: Path | None, spatial_dims: int):
        from tightfit.data.cache import TensorCache, describe

        self.entries = entries
        self.settings = settings
        self.spatial_dims = spatial_dims
        self.cache = TensorCache(cache_dir, CACHE_NAMESPACE) if cache_dir is not None else None
        self._memory: dict[int, torch.Tensor] = {}
        self._transform = None
        self._description = describe(preprocess=settings, spatial_dims=spatial_dims, monai=_monai_version())

    def __len__(self) -> int:
        return len(self.entries)

    def cache_key(self, index: int) -> str:
        """The SHA-256 of the sample's input files together with the preprocessing settings."""
        from tightfit.data.cache import TensorCache, hash_bytes, hash_file

        digests = []
        for entry in self.entries[index]:
            files = sorted(path for path in entry.rglob("*") if path.is_file()) if entry.is_dir() else [entry]
            digests += [f"{path.name}:{hash_file(path)}" for path in files]
        return TensorCache.key(hash_bytes("\n".join(digests).encode()), self._description)

    def __getitem__(self, index: int) -> torch.Tensor:
        if index in self._memory:
            return self._memory[index]
        key = self.cache_key(index) if self.cache is not None else None
        if key is not None and (stored := self.cache.load(key)) is not None:
            image = stored["image"]
        else:
            image = self.preprocess(index)
            if key is not None:
                self.cache.save(key, {"image": image})
        if self.cache is None:
            self._memory[index] = image
        return image

    def preprocess(self, index: int) -> torch.Tensor:
        """The sample through MONAI's transforms, as a plain float32 tensor ``C x *spatial``."""
        entries = self.entries[index]
        keys = [f"modality{number}" for number in range(len(entries))]
        if self._transform is None:
            self._transform = preprocess_transforms(self.settings, keys, spatial_dims=self.spatial_dims)
        try:
            output = self._transform(load_entries(entries))["image"]
        except RuntimeError as error:  # ConcatItemsd: modalities of one subject on different grids
            raise ConfigError(
                f"data: subject {entries[0].parent.name!r}: cannot stack its modalities "
                f"({str(error).splitlines()[-1][:160]}); they must share one grid"
            ) from None
        image = torch.as_tensor(np.asarray(output), dtype=torch.float32)
        if image.ndim != self.spatial_dims + 1:
            raise ConfigError(
                f"data: {entries[0]} gives an image of shape {tuple(image.shape)}, "
                f"expected {self.spatial_dims} spatial axes"
            )
        return image.contiguous()


def _monai_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("monai")
    except metadata.PackageNotFoundError:
        return "missing"


def index_volumes(root: Path, labels_path: Path, patterns: list[str]) -> tuple[list[str], list[list[Path]], LabelTable]:
    """Subjects, their modality entries (checked) and the label table of a ``medical`` source."""
    table = read_label_csv(labels_path)
    subjects, entries = [], []
    for folder in subject_folders(root, table, labels_path):
        chosen = match_modalities(folder, patterns)
        for entry in chosen:
            check_dicom_series(entry) if entry.is_dir() else check_nifti(entry)
        subjects.append(folder.name)
        entries.append(chosen)
    return subjects, entries, table


def index_images(root: Path, labels_path: Path) -> tuple[list[str], list[list[Path]], LabelTable]:
    """One sample per image file of each subject folder (``images`` source): ids ``SUBJECT/FILE``."""
    table = read_label_csv(labels_path)
    ids, entries = [], []
    for folder in subject_folders(root, table, labels_path):
        files = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ConfigError(f"data.path: subject folder {folder} holds no image ({', '.join(IMAGE_SUFFIXES)})")
        ids += [f"{folder.name}/{path.name}" for path in files]
        entries += [[path] for path in files]
    return ids, entries, table
