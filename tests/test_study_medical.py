"""Medical sources of a study (tightfit.study.medical): NIfTI and DICOM through MONAI's transforms, the cache
keyed by inputs and settings, 2D images grouped by subject, and no leakage between subjects."""

from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("monai")
pytest.importorskip("nibabel")
pytest.importorskip("pydicom")

from medical_files import write_dicom_series, write_nifti
from tightfit.cli import main
from tightfit.study.classify import shared_folds
from tightfit.study.data import load_samples
from tightfit.study.medical import PreprocessedSamples
from tightfit.study.spec import Preprocess, StudyData

SIDE = 32


def smooth_scan(coordinates: np.ndarray) -> np.ndarray:
    """A smooth, positive, asymmetric 'scan' as a function of world millimetres (x, y, z)."""
    x, y, z = coordinates
    return 1.5 + np.sin(x / 5.0) + np.cos(y / 7.0) + 0.5 * np.sin((x + z) / 9.0) + 0.03 * y


def grid(step: float, side: int) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(side) * step] * 3, indexing="ij")).astype(np.float32)


def settings(**changes) -> dict:
    return Preprocess(**{"spacing": [2, 2, 2], "shape": [16, 16, 16], **changes}).model_dump(mode="json")


def test_lps_and_ras_storage_of_one_scan_preprocess_to_the_same_array(tmp_path):
    scan = smooth_scan(grid(1.0, SIDE))
    ras = write_nifti(tmp_path / "ras.nii.gz", scan)
    # the same voxels stored left-to-right and anterior-to-posterior flipped, the affine saying so (LPS)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[:2, 3] = SIDE - 1
    lps = write_nifti(tmp_path / "lps.nii.gz", scan[::-1, ::-1, :], affine)
    oriented = PreprocessedSamples([[ras], [lps]], settings(), None, spatial_dims=3)
    assert oriented[0].shape == (1, 16, 16, 16)
    assert np.allclose(oriented[0], oriented[1], atol=1e-5)
    as_stored = PreprocessedSamples([[ras], [lps]], settings(orientation=None), None, spatial_dims=3)
    assert not np.allclose(as_stored[0], as_stored[1], atol=0.1)  # without Orientationd they differ


def test_1mm_and_2mm_scans_resampled_to_one_spacing_agree_to_interpolation_tolerance(tmp_path):
    fine = write_nifti(tmp_path / "fine.nii.gz", smooth_scan(grid(1.0, SIDE)))
    coarse = write_nifti(tmp_path / "coarse.nii.gz", smooth_scan(grid(2.0, SIDE // 2)), np.diag([2.0, 2.0, 2.0, 1.0]))
    # 1.5 mm lies on neither grid: both scans are interpolated, each from its own samples, onto one world grid
    samples = PreprocessedSamples(
        [[fine], [coarse]], settings(spacing=[1.5] * 3, shape=None, zscore=False), None, spatial_dims=3
    )
    first, second = samples[0].numpy(), samples[1].numpy()
    # the fine scan spans 31 mm, the coarse one 30 mm: 22 against 21 voxels of 1.5 mm from the same origin
    assert first.shape == (1, 22, 22, 22) and second.shape == (1, 21, 21, 21)
    common = (slice(None),) + (slice(0, 20),) * 3
    difference = np.abs(first[common] - second[common])
    assert difference.max() < 0.1 and difference.mean() < 0.03  # the scan's sd is about 1
    assert np.abs(first[common] - first[common][:, ::-1]).mean() > 0.3  # and it is not flat


def test_a_dicom_series_is_sorted_by_position_and_equals_its_nifti(tmp_path):
    volume = (np.random.default_rng(0).random((6, 10, 12)) * 1000).astype(np.uint16)
    series = write_dicom_series(tmp_path / "dicom" / "mr", volume, spacing=(1.0, 1.0, 2.0))
    # the same voxels as NIfTI: axis 0 = columns (+x in LPS, so -x in RAS), 1 = rows (-y), 2 = slices (+z, 2 mm)
    nifti = write_nifti(tmp_path / "mr.nii.gz", np.transpose(volume, (2, 1, 0)), np.diag([-1.0, -1.0, 2.0, 1.0]))
    plain = Preprocess(zscore=False).model_dump(mode="json")
    samples = PreprocessedSamples([[series], [nifti]], plain, None, spatial_dims=3)
    assert samples[0].shape == (1, 12, 10, 6)
    assert np.array_equal(samples[0].numpy(), samples[1].numpy())


def test_the_cache_is_keyed_by_input_files_and_transform_settings(tmp_path):
    path = write_nifti(tmp_path / "scan.nii.gz", smooth_scan(grid(1.0, 16)))
    cache = tmp_path / "cache"
    first = PreprocessedSamples([[path]], settings(shape=[8, 8, 8]), cache, spatial_dims=3)
    reference = first[0]
    assert first.cache.misses == 1 and first.cache.entries() == 1
    again = PreprocessedSamples([[path]], settings(shape=[8, 8, 8]), cache, spatial_dims=3)
    assert np.array_equal(again[0], reference) and again.cache.hits == 1  # read back, not recomputed
    changed = PreprocessedSamples([[path]], settings(shape=[8, 8, 8], clip_percentiles=[5, 95]), cache, spatial_dims=3)
    assert not np.allclose(changed[0], reference) and changed.cache.misses == 1  # a new transform is a new entry
    write_nifti(path, smooth_scan(grid(1.0, 16)) * 2 + np.arange(16)[:, None, None])
    edited = PreprocessedSamples([[path]], settings(shape=[8, 8, 8]), cache, spatial_dims=3)
    assert not np.allclose(edited[0], reference) and edited.cache.misses == 1  # new content, new entry


def write_brats_like(root: Path, subjects: int, modalities=("t1", "flair")) -> tuple[Path, Path]:
    generator = np.random.default_rng(1)
    rows = ["subject,label"]
    for number in range(subjects):
        subject = f"case-{number:02d}"
        for modality in modalities:
            write_nifti(root / subject / f"{subject}_{modality}.nii.gz", generator.random((12, 12, 10)) + 0.5)
        rows.append(f"{subject},{'tumour' if number % 2 else 'healthy'}")
    labels = root / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    return root, labels


def test_medical_source_stacks_modalities_as_channels_with_csv_labels(tmp_path):
    root, labels = write_brats_like(tmp_path / "brats", 6)
    data = StudyData(
        source="medical",
        path=str(root),
        labels=str(labels),
        modalities=["*_t1.nii.gz", "*_flair.nii.gz"],
        preprocess={"shape": None},
        development_fraction=0.5,
    )
    samples = load_samples(data, seed=0, cache_dir=tmp_path / "cache")
    assert samples.ids == [f"case-{number:02d}" for number in range(6)]
    assert samples.class_names == ["healthy", "tumour"] and samples.labels.tolist() == [0, 1, 0, 1, 0, 1]
    image = samples.dataset[0]
    assert image.shape == (2, 12, 12, 10)
    nonzero = image[0][image[0] != 0]
    assert abs(float(nonzero.mean())) < 1e-4 and abs(float(nonzero.std()) - 1) < 0.05  # z-scored per channel


def write_image_subjects(root: Path, subjects: int, per_subject: int, labels_of) -> Path:
    """PNG slices: each subject has its own strong pattern (what a leaky split lets a classifier memorise)."""
    from PIL import Image

    generator = np.random.default_rng(7)
    rows = ["subject,label"]
    for number in range(subjects):
        subject = f"subject-{number:02d}"
        pattern = generator.random((8, 8)) * 200
        for index in range(per_subject):
            pixels = np.clip(pattern + generator.normal(0, 2, (8, 8)) + 20, 0, 255).astype(np.uint8)
            (root / subject).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, mode="L").save(root / subject / f"slice-{index}.png")
        rows.append(f"{subject},{labels_of(number)}")
    labels = root / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    return labels


def test_images_source_keeps_every_subject_on_one_side_of_the_split_and_the_folds(tmp_path):
    root = tmp_path / "images"
    labels = write_image_subjects(root, 12, 5, lambda number: "ab"[number % 2])
    samples = load_samples(
        StudyData(source="images", path=str(root), labels=str(labels), development_fraction=0.5), seed=0
    )
    assert len(samples.ids) == 60 and samples.dataset[0].shape == (1, 8, 8)
    assert not set(samples.groups[samples.development]) & set(samples.groups[samples.evaluation])
    groups = samples.groups[samples.evaluation]
    folds = shared_folds(samples.labels[samples.evaluation], groups, 3, 2, seed=0)
    for _, train, test in folds:
        assert not set(groups[train]) & set(groups[test])  # no subject in two folds


def test_labels_shuffled_across_subjects_give_chance_through_the_whole_study(tmp_path):
    """Yagis et al. (2021): slice-level splits reach ~96 % on random labels. Grouped by subject, chance."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    from tightfit.study.features import read_features

    root = tmp_path / "images"
    shuffled = np.random.default_rng(3).permutation(np.repeat(["healthy", "tumour"], 20))
    labels = write_image_subjects(root, 40, 4, lambda number: shuffled[number])
    study = {
        "name": "shuffled",
        "folder": str(tmp_path / "study"),
        "device": "cpu",
        "threads": 1,
        "data": {"source": "images", "path": str(root), "labels": str(labels), "development_fraction": 0},
        "cv": {"folds": 4, "repeats": 1, "seed": 0},
        "tracking": {"mlflow": False},
        "stages": [
            {
                "name": "features",
                "kind": "extract",
                "model": "builtin:digits-cnn",
                "model_kwargs": {"in_channels": 1},
                "layer": "features.2",
                "pooling": "flatten",
            },  # the 4x4 maps after the pooling: the pattern survives
            {
                "name": "classify",
                "kind": "classify",
                "from": ["features"],
                "classifiers": [{"name": "knn", "neighbours": 1}, "logreg"],
            },
            {"name": "statistics", "kind": "evaluate", "from": "classify", "bootstrap": 100},
        ],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    assert main(["run", str(path)]) == 0
    results = yaml.safe_load((tmp_path / "study" / "results.json").read_text())
    table = results["evaluations"]["statistics"]["table"]
    assert {row["classifier"] for row in table} == {"knn", "logreg"}
    for row in table:
        assert row["accuracy"] < 0.72, row  # 160 slices of 40 subjects: chance is 0.5, sd ~0.08 by subject
    # the same features split by slice instead of by subject: the subjects' patterns are memorised
    features = read_features(tmp_path / "study/stages/features/features")
    leaky = cross_val_score(
        KNeighborsClassifier(1), features.features, features.labels, cv=StratifiedKFold(4, shuffle=True, random_state=0)
    ).mean()
    assert leaky > 0.9, leaky
    assert "grouped by subject" in (tmp_path / "study" / "results.md").read_text()


def test_slices_all_central_and_foreground_are_aggregated_per_subject():
    import torch

    from tightfit.study.spec import SliceConfig
    from tightfit.study.stages import _features

    def slice_number(batch):  # a stand-in extractor: each slice's feature is its mean value
        return batch.flatten(1).mean(1, keepdim=True)

    volumes = torch.zeros(2, 1, 6, 3, 3)
    for depth in range(6):
        volumes[:, :, depth] = depth + 1
    volumes[1, :, :2] = 0  # subject 1: the first two slices are background
    assert _features(slice_number, volumes, SliceConfig(axis=0, select="all", aggregate="all")).shape == (2, 6)
    central = _features(slice_number, volumes, SliceConfig(axis=0, select="central", count=2, aggregate="all"))
    assert central[0].tolist() == [3.0, 4.0]  # slices 2 and 3 of 0..5
    foreground = _features(slice_number, volumes, SliceConfig(axis=0, select="foreground", aggregate="mean"))
    assert foreground[:, 0].tolist() == [3.5, 4.5]  # subject 1 averages slices 3..6 only
    assert _features(slice_number, volumes, SliceConfig(axis=0, aggregate="max"))[:, 0].tolist() == [6.0, 6.0]


def test_the_brats_like_example_writes_mixed_geometry_that_the_study_brings_to_one_grid(tmp_path):
    import importlib.util

    import nibabel

    from tightfit.study.spec import load_study

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("make_brats_like", repo / "examples/data/make_brats_like.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_dataset(tmp_path / "brats", subjects=4)
    affines = [nibabel.load(str(path)).affine for path in sorted((tmp_path / "brats").glob("*/*_t1.nii.gz"))]
    assert {float(affine[0, 0]) for affine in affines} == {1.0, -1.5, 1.5, -1.0}  # LPS and RAS, 1 and 1.5 mm
    config = load_study(repo / "examples/pipelines/brats-like-study.yaml", data_path=str(tmp_path / "brats"))
    samples = load_samples(config.data, seed=0)
    assert samples.class_names == ["healthy", "tumour"]
    assert all(tuple(samples.dataset[index].shape) == (4, 24, 24, 24) for index in range(4))
