"""The data config, splits and the built-in digits source."""

import numpy as np
import pytest
import torch

from tightfit.data import DataConfig, build_datasets, parse_data_config
from tightfit.data.splits import limit_indices, split_indices
from tightfit.errors import ConfigError


def test_digits_builds_stratified_splits_of_the_right_shapes():
    bundle = build_datasets(DataConfig(), seed=0)
    sizes = bundle.sizes()
    assert sum(sizes.values()) == 1797
    assert sizes["val"] == pytest.approx(0.15 * 1797, abs=10)
    assert sizes["test"] == pytest.approx(0.15 * 1797, abs=10)
    image, label = bundle.train[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32
    assert label.dtype == torch.int64
    assert bundle.input_shape == (1, 8, 8) and bundle.num_classes == 10
    assert bundle.class_names == [str(d) for d in range(10)]
    assert 0.0 <= float(bundle.train.inputs.min()) and float(bundle.train.inputs.max()) <= 1.0
    # Stratified: every class keeps its share in every split (within one sample per class).
    full = np.bincount(np.concatenate([s.targets.numpy() for s in (bundle.train, bundle.val, bundle.test)]))
    for split in (bundle.val, bundle.test):
        counts = np.bincount(split.targets.numpy(), minlength=10)
        assert np.all(np.abs(counts - full * 0.15) <= 1)


def test_digits_split_is_deterministic_for_a_seed_and_changes_with_it():
    first = build_datasets({"source": "digits"}, seed=3)
    again = build_datasets({"source": "digits"}, seed=3)
    other = build_datasets({"source": "digits"}, seed=4)
    assert torch.equal(first.test.inputs, again.test.inputs)
    assert not torch.equal(first.test.inputs, other.test.inputs)
    pinned = build_datasets({"source": "digits", "seed": 3}, seed=99)
    assert torch.equal(first.test.inputs, pinned.test.inputs)


def test_standardisation_is_fitted_on_train_only():
    bundle = build_datasets({"source": "digits", "normalize": "standard"}, seed=0)
    assert float(bundle.train.inputs.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(bundle.train.inputs.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
    # The held-out splits use the training statistics, so their mean is not forced to zero.
    assert float(bundle.test.inputs.mean()) != pytest.approx(0.0, abs=1e-6)


def test_split_indices_are_disjoint_cover_everything_and_are_stratified():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    train, val, test = split_indices(100, val_fraction=0.2, test_fraction=0.1, seed=1, labels=labels)
    together = np.concatenate([train, val, test])
    assert len(together) == 100 and len(np.unique(together)) == 100
    assert np.bincount(labels[val]).tolist() == [10, 6, 4]
    assert np.bincount(labels[test]).tolist() == [5, 3, 2]
    again = split_indices(100, val_fraction=0.2, test_fraction=0.1, seed=1, labels=labels)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again))


def test_a_small_class_still_reaches_every_split_and_training_keeps_one():
    labels = np.array([0] * 40 + [1] * 3)
    train, val, test = split_indices(43, val_fraction=0.1, test_fraction=0.1, seed=0, labels=labels)
    assert sorted(set(labels[val])) == [0, 1] and sorted(set(labels[test])) == [0, 1]
    assert 1 in set(labels[train])


def test_limit_takes_a_seeded_subset_of_each_split():
    bundle = build_datasets({"source": "digits", "limit": 50}, seed=0)
    assert bundle.sizes() == {"train": 50, "val": 50, "test": 50}
    subset = limit_indices(np.arange(1000), 10, seed=5)
    assert len(subset) == 10 and np.array_equal(subset, limit_indices(np.arange(1000), 10, seed=5))
    assert not np.array_equal(subset, np.arange(10))


def test_zero_fractions_give_no_split():
    bundle = build_datasets({"source": "digits", "val_fraction": 0, "test_fraction": 0}, seed=0)
    assert bundle.val is None and bundle.test is None and len(bundle.train) == 1797


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"source": "digit"}, ["data.source", "did you mean 'digits'", "image-folder"]),
        ({"sorce": "digits"}, ["data.sorce", "unknown key", "did you mean 'source'"]),
        ({"columns": {"txt": "a"}}, ["data.columns.txt", "did you mean 'text'"]),
        ({"augment": ["hflp"]}, ["data.augment", "did you mean 'hflip'"]),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, ["leaves no training data"]),
        ({"limit": 0}, ["data.limit"]),
        ({"num_workers": -1}, ["data.num_workers"]),
        ({"num_workers": "many"}, ["data.num_workers: should be a valid integer or 'auto' (got 'many')"]),
        ({"cache": 3}, ["data.cache: should be a valid boolean or a valid string (got 3)"]),
        ({"normalize": "z"}, ["data.normalize: should be 'auto', 'unit', 'standard' or 'none'"]),
    ],
)
def test_bad_settings_are_config_errors_naming_the_key(settings, expected):
    with pytest.raises(ConfigError) as caught:
        parse_data_config(settings)
    message = str(caught.value)
    assert "\n" not in message
    for part in expected:
        assert part in message


def test_a_single_augmentation_may_be_given_as_a_string():
    assert DataConfig(augment="hflip").augment == ["hflip"]


def test_a_non_mapping_data_section_is_a_config_error():
    with pytest.raises(ConfigError, match="data: expected a mapping"):
        parse_data_config(["digits"])


def test_reading_the_data_config_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, tightfit.data.config, tightfit.data; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
