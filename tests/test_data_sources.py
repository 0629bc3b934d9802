"""Every data source builds the right samples, splits, caches and errors (small files in tmp_path)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tightfit.data import DataError, build_datasets, from_arrays, make_dataloader
from tightfit.data.build import resolve_num_workers, resolve_pin_memory
from tightfit.data.config import DataConfig
from tightfit.data.image_folder import ImageDecoder
from tightfit.errors import ConfigError

# ---------------------------------------------------------------- helpers


def write_image_folder(root, classes=("cat", "dog", "emu"), per_class=10, size=(12, 16), seed=0):
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index:03d}.png")
    return root


def all_labels(split):
    return [int(split[i][1]) for i in range(len(split))]


# ---------------------------------------------------------------- tensors


@pytest.mark.parametrize("suffix", [".npz", ".pt", ".safetensors"])
def test_tensor_files_load_safely_and_split(tmp_path, suffix):
    inputs = np.random.default_rng(0).random((60, 3, 4, 4)).astype(np.float32)
    targets = np.arange(60) % 3
    path = tmp_path / f"data{suffix}"
    if suffix == ".npz":
        np.savez(path, inputs=inputs, targets=targets)
    elif suffix == ".pt":
        torch.save({"inputs": torch.from_numpy(inputs), "targets": torch.from_numpy(targets)}, path)
    else:
        from safetensors.torch import save_file

        save_file({"inputs": torch.from_numpy(inputs), "targets": torch.from_numpy(targets)}, str(path))
    bundle = build_datasets({"source": "tensors", "path": str(path), "val_fraction": 0.2, "test_fraction": 0.2})
    assert bundle.sizes() == {"train": 36, "val": 12, "test": 12}
    assert bundle.num_classes == 3 and bundle.input_shape == (3, 4, 4) and bundle.task == "classification"
    sample, label = bundle.train[0]
    assert sample.dtype == torch.float32 and label.dtype == torch.int64
    assert np.bincount(bundle.test.targets.numpy()).tolist() == [4, 4, 4]  # stratified
    # Every training input is one of the file's rows, unchanged (no normalisation asked for).
    rows = {row.tobytes() for row in inputs}
    assert all(bundle.train.inputs[i].numpy().tobytes() in rows for i in range(len(bundle.train)))


def test_a_pickled_object_in_a_pt_file_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"inputs": torch.zeros(4, 2), "targets": torch.zeros(4), "extra": {1, 2}, "obj": object}, path)
    with pytest.raises(DataError, match="evil.pt"):
        build_datasets({"source": "tensors", "path": str(path)})


def test_a_missing_array_names_the_key_and_what_the_file_holds(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, x=np.zeros((4, 2)), y=np.zeros(4))
    with pytest.raises(ConfigError, match=r"data.columns.inputs: no array 'inputs'.*holds: x, y"):
        build_datasets({"source": "tensors", "path": str(path)})
    bundle = build_datasets(
        {
            "source": "tensors",
            "path": str(path),
            "columns": {"inputs": "x", "target": "y"},
            "task": "regression",
            "val_fraction": 0,
            "test_fraction": 0,
        }
    )
    assert bundle.train.targets.shape == (4, 1)  # regression targets match a (batch, 1) prediction


def test_from_arrays_regression_and_uint8_images():
    rng = np.random.default_rng(0)
    bundle = from_arrays(rng.random((50, 5)), rng.random(50), {"normalize": "standard"})
    assert bundle.task == "regression" and bundle.num_classes is None
    assert bundle.train.targets.shape[1:] == (1,)
    assert float(bundle.train.inputs.mean()) == pytest.approx(0.0, abs=1e-5)
    images = from_arrays(rng.integers(0, 256, (40, 1, 6, 6), dtype=np.uint8), np.arange(40) % 2)
    assert 0.0 <= float(images.train.inputs.min()) and float(images.train.inputs.max()) <= 1.0
    with pytest.raises(DataError, match="40 inputs but 39 targets"):
        from_arrays(np.zeros((40, 2)), np.zeros(39, dtype=np.int64))


def test_tensors_without_path_or_with_a_bad_path_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.path"):
        build_datasets({"source": "tensors"})
    with pytest.raises(ConfigError, match="data.path: no such file"):
        build_datasets({"source": "tensors", "path": str(tmp_path / "nope.npz")})
    (tmp_path / "data.h5").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"\.npz"):
        build_datasets({"source": "tensors", "path": str(tmp_path / "data.h5")})


# ---------------------------------------------------------------- image folder


def test_image_folder_split_by_fraction_is_stratified_disjoint_and_deterministic(tmp_path):
    root = write_image_folder(tmp_path / "images")
    settings = {"source": "image-folder", "path": str(root), "val_fraction": 0.2, "test_fraction": 0.2}
    bundle = build_datasets(settings, seed=1)
    assert bundle.sizes() == {"train": 18, "val": 6, "test": 6}
    assert bundle.class_names == ["cat", "dog", "emu"] and bundle.num_classes == 3
    assert bundle.input_shape == (3, 12, 16)
    image, label = bundle.train[0]
    assert image.shape == (3, 12, 16) and image.dtype == torch.float32 and label.dtype == torch.int64
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert sorted(all_labels(bundle.val)) == [0, 0, 1, 1, 2, 2]
    paths = [{str(p) for p, _ in split.items} for split in (bundle.train, bundle.val, bundle.test)]
    assert not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])
    assert len(paths[0] | paths[1] | paths[2]) == 30
    again = build_datasets(settings, seed=1)
    assert [p for p, _ in again.test.items] == [p for p, _ in bundle.test.items]
    other = build_datasets(settings, seed=2)
    assert [p for p, _ in other.test.items] != [p for p, _ in bundle.test.items]


def test_image_folder_uses_split_folders_and_rejects_unknown_classes(tmp_path):
    write_image_folder(tmp_path / "data" / "train", per_class=4)
    write_image_folder(tmp_path / "data" / "val", classes=("cat", "dog"), per_class=2, seed=1)
    settings = {"source": "image-folder", "path": str(tmp_path / "data"), "test_fraction": 0.25}
    bundle = build_datasets(settings)
    # val comes from val/, test is carved from train/ by its fraction.
    assert bundle.sizes() == {"train": 9, "val": 4, "test": 3}
    assert all("/val/" in str(path) for path, _ in bundle.val.items)
    assert all("/train/" in str(path) for path, _ in bundle.test.items)
    write_image_folder(tmp_path / "data" / "test", classes=("yak",), per_class=1)
    with pytest.raises(DataError, match="'yak' is not among the training classes"):
        build_datasets(settings)


def test_greyscale_resize_and_centre_crop(tmp_path):
    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, 10:30] = 255  # a white band in the middle of a black image
    Image.fromarray(pixels).save(root / "a" / "wide.png")
    Image.fromarray(pixels[:, :20]).save(root / "a" / "square.png")
    bundle = build_datasets(
        {
            "source": "image-folder",
            "path": str(root),
            "color_mode": "L",
            "image_size": 8,
            "val_fraction": 0,
            "test_fraction": 0,
        }
    )
    assert bundle.input_shape == (1, 8, 8)
    wide = next(bundle.train[i][0] for i, (p, _) in enumerate(bundle.train.items) if p.name == "wide.png")
    assert wide.shape == (1, 8, 8)
    # The centre crop of the wide image is the white band (its edges blur a little).
    assert float(wide[0, :, 2:6].mean()) > 0.95


def test_corrupt_image_is_named_or_skipped(tmp_path):
    root = write_image_folder(tmp_path / "images", per_class=4)
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    settings = {"source": "image-folder", "path": str(root)}
    with pytest.raises(DataError, match=r"dog/broken\.png.*on_corrupt: skip"):
        build_datasets(settings)
    with pytest.warns(UserWarning, match="broken.png"):
        bundle = build_datasets({**settings, "on_corrupt": "skip"})
    assert sum(bundle.sizes().values()) == 12
    assert bundle.metadata["skipped_files"] == [str(root / "dog" / "broken.png")]


def test_truncated_image_fails_at_decode_naming_the_file(tmp_path):
    root = write_image_folder(tmp_path / "images", per_class=3)
    target = root / "cat" / "000.png"
    target.write_bytes(target.read_bytes()[:80])  # header intact, pixel data cut off
    bundle = build_datasets({"source": "image-folder", "path": str(root), "val_fraction": 0, "test_fraction": 0})
    index = next(i for i, (path, _) in enumerate(bundle.train.items) if path == target)
    with pytest.raises(DataError, match=r"cat/000\.png: cannot decode"):
        bundle.train[index]
    skipping = build_datasets(
        {"source": "image-folder", "path": str(root), "val_fraction": 0, "test_fraction": 0, "on_corrupt": "skip"}
    )
    with pytest.warns(UserWarning, match="000.png"):
        image, label = skipping.train[index]
    assert image.shape == (3, 12, 16)


def test_augmentation_applies_to_train_only(tmp_path):
    root = write_image_folder(tmp_path / "images")
    base = {"source": "image-folder", "path": str(root)}
    plain = build_datasets(base)
    flipped = build_datasets({**base, "augment": ["hflip:1.0"]})
    assert torch.equal(flipped.train[0][0], torch.flip(plain.train[0][0], dims=[-1]))
    assert torch.equal(flipped.val[0][0], plain.val[0][0])
    assert torch.equal(flipped.test[0][0], plain.test[0][0])
    digits = build_datasets({"source": "digits", "augment": ["vflip:1"]})
    digits_plain = build_datasets({"source": "digits"})
    assert torch.equal(digits.train[3][0], torch.flip(digits_plain.train[3][0], dims=[-2]))
    assert torch.equal(digits.val[3][0], digits_plain.val[3][0])


def test_every_named_augmentation_keeps_the_image_shape():
    from tightfit.data.transforms import AUGMENTATIONS, build_augmentation

    torch.manual_seed(0)
    for channels in (1, 3):
        image = torch.rand(channels, 16, 12)
        for name in AUGMENTATIONS:
            assert build_augmentation([name], (16, 12))(image).shape == (channels, 16, 12), name


def test_exif_orientation_is_applied(tmp_path):
    root = tmp_path / "images" / "a"
    root.mkdir(parents=True)
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)  # stored landscape, 20 wide:
    pixels[:, :10] = 255  # white left half, black right half
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # tagged "rotate 90° clockwise to display": a portrait photo, white on top
    image.save(root / "photo.jpg", exif=exif, quality=95)
    bundle = build_datasets(
        {"source": "image-folder", "path": str(tmp_path / "images"), "val_fraction": 0, "test_fraction": 0}
    )
    assert bundle.input_shape == (3, 20, 10)  # the displayed size, not the stored one
    decoded = bundle.train[0][0]
    assert decoded.shape == (3, 20, 10)
    assert float(decoded[:, :8].mean()) > 0.9 and float(decoded[:, 12:].mean()) < 0.1


def test_image_folder_standardisation_and_limit(tmp_path):
    root = write_image_folder(tmp_path / "images", per_class=12)
    bundle = build_datasets({"source": "image-folder", "path": str(root), "normalize": "standard", "limit": 5})
    assert bundle.sizes() == {"train": 5, "val": 5, "test": 5}
    mean = bundle.metadata["normalization"]["mean"]
    assert len(mean) == 3 and all(0.4 < m < 0.6 for m in mean)  # uniform noise averages 0.5
    stacked = torch.stack([bundle.train[i][0] for i in range(5)])
    assert abs(float(stacked.mean())) < 0.2


def test_image_folder_bad_settings(tmp_path):
    with pytest.raises(ConfigError, match="data.path"):
        build_datasets({"source": "image-folder"})
    with pytest.raises(ConfigError, match="no such folder"):
        build_datasets({"source": "image-folder", "path": str(tmp_path / "missing")})
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(DataError, match="one sub-folder per class"):
        build_datasets({"source": "image-folder", "path": str(tmp_path / "flat")})


def test_image_folder_streams_through_worker_processes(tmp_path):
    root = write_image_folder(tmp_path / "images", per_class=4)
    config = DataConfig(source="image-folder", path=str(root), num_workers=2, val_fraction=0, test_fraction=0)
    bundle = build_datasets(config)
    loader = make_dataloader(bundle.train, config, batch_size=4, shuffle=False)
    batches = list(loader)
    assert len(batches) == 3 and batches[0][0].shape == (4, 3, 12, 16)
    assert torch.equal(batches[0][0][1], bundle.train[1][0])


# ---------------------------------------------------------------- cache


def test_image_cache_hits_on_second_build_and_misses_on_changes(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "images", per_class=3)
    cache = tmp_path / "cache"
    settings = {
        "source": "image-folder",
        "path": str(root),
        "cache": str(cache),
        "val_fraction": 0,
        "test_fraction": 0,
        "image_size": 8,
    }
    first = build_datasets(settings)
    decoded = [first.train[i][0] for i in range(len(first.train))]
    assert len(list(cache.rglob("*.safetensors"))) == 9

    calls = []
    real_decode = ImageDecoder.decode_bytes

    def counting_decode(self, data, path):
        calls.append(path.name)
        return real_decode(self, data, path)

    monkeypatch.setattr(ImageDecoder, "decode_bytes", counting_decode)
    second = build_datasets(settings)
    assert all(torch.equal(second.train[i][0], decoded[i]) for i in range(len(decoded)))
    assert calls == []  # every image came from the cache
    assert second.train.decoder.cache.hits == 9

    # New content under the same name: that one file is decoded again.
    changed = root / "dog" / "001.png"
    Image.fromarray(np.full((12, 16, 3), 7, dtype=np.uint8)).save(changed)
    third = build_datasets(settings)
    index = next(i for i, (path, _) in enumerate(third.train.items) if path == changed)
    assert float(third.train[index][0].max()) == pytest.approx(7 / 255)
    assert calls == ["001.png"]
    # A different transform (size) is a different key: everything is decoded again.
    calls.clear()
    resized = build_datasets({**settings, "image_size": 6})
    for i in range(len(resized.train)):
        resized.train[i]
    assert len(calls) == 9


def test_a_damaged_cache_entry_is_recomputed(tmp_path):
    root = write_image_folder(tmp_path / "images", classes=("a",), per_class=1)
    settings = {
        "source": "image-folder",
        "path": str(root),
        "cache": str(tmp_path / "cache"),
        "val_fraction": 0,
        "test_fraction": 0,
    }
    expected = build_datasets(settings).train[0][0]
    (entry,) = (tmp_path / "cache").rglob("*.safetensors")
    entry.write_bytes(b"garbage")
    again = build_datasets(settings)
    assert torch.equal(again.train[0][0], expected)
    assert again.train.decoder.cache.misses == 1


# ---------------------------------------------------------------- csv


def write_csv(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_classification_with_text_labels_categories_and_missing_cells(tmp_path):
    rng = np.random.default_rng(0)
    lines = ["height,weight,colour,species"]
    for row in range(60):
        weight = "" if row % 10 == 0 else f"{rng.normal(50, 5):.2f}"
        lines.append(f"{rng.normal(170, 10):.1f},{weight},{['red', 'green'][row % 2]},{['ant', 'bee', 'cow'][row % 3]}")
    bundle = build_datasets({"source": "csv", "path": str(write_csv(tmp_path / "t.csv", lines))})
    assert bundle.task == "classification" and bundle.class_names == ["ant", "bee", "cow"]
    assert bundle.input_shape == (4,)  # height, weight, colour=green, colour=red
    assert bundle.metadata["features"] == ["height", "weight", "colour=green", "colour=red"]
    assert bundle.metadata["imputed_cells"] == 6
    assert not torch.isnan(bundle.train.inputs).any()
    # Standardised with training statistics only.
    assert torch.allclose(bundle.train.inputs.mean(0), torch.zeros(4), atol=1e-5)
    assert np.bincount(bundle.test.targets.numpy()).tolist() == [3, 3, 3]


def test_csv_regression_target_and_feature_selection(tmp_path):
    lines = ["a;b;noise;price"] + [f"{i};{i % 7};{(i * 37) % 11};{i * 1.5 + 0.25}" for i in range(40)]
    path = write_csv(tmp_path / "r.csv", lines)
    bundle = build_datasets({"source": "csv", "path": str(path), "columns": {"features": ["a", "b"]}})
    assert bundle.task == "regression" and bundle.input_shape == (2,)
    assert bundle.train.targets.dtype == torch.float32 and bundle.train.targets.shape[1:] == (1,)
    as_classes = build_datasets({"source": "csv", "path": str(path), "columns": {"target": "b"}})
    assert as_classes.task == "classification" and as_classes.num_classes == 7


def test_csv_bad_inputs(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["x,y,label", "1,2,a", "3,4,b", "5,6,a", "7,8,b"])
    with pytest.raises(ConfigError, match=r"data.columns.target: no column 'Label'.*did you mean 'label'"):
        build_datasets({"source": "csv", "path": str(path), "columns": {"target": "Label"}})
    with pytest.raises(ConfigError, match=r"data.columns.features: no column 'z'.*columns: x, y, label"):
        build_datasets({"source": "csv", "path": str(path), "columns": {"features": ["x", "z"]}})
    with pytest.raises(DataError, match=r"t.csv, line 2: target 'a' in column 'label' is not a number"):
        build_datasets({"source": "csv", "path": str(path), "task": "regression"})
    ragged = write_csv(tmp_path / "ragged.csv", ["x,y,label", "1,2,a", "3,b"])
    with pytest.raises(DataError, match=r"ragged.csv, line 3: 2 cells but the header has 3"):
        build_datasets({"source": "csv", "path": str(ragged)})


# ---------------------------------------------------------------- loaders


def test_workers_and_pinned_memory_are_chosen_where_they_help(tmp_path, monkeypatch):
    digits = build_datasets({"source": "digits", "limit": 10})
    config = DataConfig()
    assert resolve_num_workers(digits.train, config) == 0
    root = write_image_folder(tmp_path / "images", per_class=2)
    images = build_datasets({"source": "image-folder", "path": str(root)})
    import tightfit.data.build as build_module

    for cores, expected in ((16, 4), (2, 1), (1, 0)):
        monkeypatch.setattr(build_module.os, "sched_getaffinity", lambda _, n=cores: set(range(n)), raising=False)
        assert resolve_num_workers(images.train, config) == expected
    assert resolve_num_workers(images.train, DataConfig(num_workers=0)) == 0
    assert resolve_pin_memory(config, "cuda") is True
    assert resolve_pin_memory(config, "cpu") is False
    assert resolve_pin_memory(DataConfig(pin_memory=True), "mps") is False
    loader = make_dataloader(digits.train, config, batch_size=4, device_type="cpu")
    inputs, targets = next(iter(loader))
    assert inputs.shape == (4, 1, 8, 8) and targets.shape == (4,)


# ---------------------------------------------------------------- text


def test_packaged_text_set_splits_tokenises_and_pads_per_batch():
    bundle = build_datasets({"source": "text-csv", "path": "packaged:support-messages"}, seed=0)
    assert bundle.sizes() == {"train": 280, "val": 60, "test": 60}
    assert bundle.class_names == ["praise", "problem", "question", "suggestion"]
    assert np.bincount(bundle.test.labels.numpy()).tolist() == [15, 15, 15, 15]
    sample = bundle.train[0]
    assert set(sample) == {"input_ids", "attention_mask", "labels"}
    assert sample["input_ids"].dtype == torch.int64 and sample["labels"].dtype == torch.int64
    batch = next(iter(DataLoader(bundle.train, batch_size=8, collate_fn=bundle.collate_fn)))
    lengths = [len(bundle.train[i]["input_ids"]) for i in range(8)]
    assert batch["input_ids"].shape == (8, -(-max(lengths) // 8) * 8)
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["labels"].shape == (8,)
    again = build_datasets({"source": "text-csv", "path": "packaged:support-messages"}, seed=0)
    assert torch.equal(again.test.token_ids, bundle.test.token_ids)


def test_text_csv_cache_hits_and_is_invalidated_by_content_and_settings(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["text,label"] + [f"sentence number {i},{'ab'[i % 2]}" for i in range(20)])
    settings = {"source": "text-csv", "path": str(path), "cache": str(tmp_path / "cache")}
    assert build_datasets(settings).metadata["cache_hit"] is False
    hit = build_datasets(settings)
    assert hit.metadata["cache_hit"] is True
    assert torch.equal(hit.train.token_ids, build_datasets({**settings, "cache": False}).train.token_ids)
    assert build_datasets({**settings, "max_length": 4}).metadata["cache_hit"] is False
    short = build_datasets({**settings, "max_length": 4})
    assert short.metadata["cache_hit"] is True and short.metadata["longest_tokens"] == 4
    write_csv(path, ["text,label"] + [f"another sentence {i},{'ab'[i % 2]}" for i in range(20)])
    assert build_datasets(settings).metadata["cache_hit"] is False


def test_text_csv_bad_inputs(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["sentence,label", "hello,a", "bye,b"])
    with pytest.raises(ConfigError, match=r"data.columns.text: no column 'text'.*columns: sentence, label"):
        build_datasets({"source": "text-csv", "path": str(path)})
    with pytest.raises(ConfigError, match=r"no packaged data set 'nope'.*support-messages"):
        build_datasets({"source": "text-csv", "path": "packaged:nope"})
    with pytest.raises(ConfigError, match="data.tokenizer: no such folder"):
        build_datasets(
            {
                "source": "text-csv",
                "path": str(path),
                "columns": {"text": "sentence"},
                "tokenizer": str(tmp_path / "tok"),
            }
        )
    (tmp_path / "empty_tok").mkdir()
    with pytest.raises(ConfigError, match="holds no tokenizer files"):
        build_datasets(
            {
                "source": "text-csv",
                "path": str(path),
                "columns": {"text": "sentence"},
                "tokenizer": str(tmp_path / "empty_tok"),
            }
        )


# ---------------------------------------------------------------- captioned images


def write_captioned(root, split, count, as_text_files=False, seed=0):
    images = root / split / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    captions = {}
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(images / f"{index}.png")
        caption = f"a small painting number {index}"
        if as_text_files:
            (images / f"{index}.txt").write_text(caption)
        else:
            captions[f"{index}.png"] = caption
    if not as_text_files:
        (root / split / "captions.json").write_text(json.dumps(captions))


@pytest.fixture(scope="module")
def tokenizer_dir():
    from tightfit.data.text import default_tokenizer_dir

    return str(default_tokenizer_dir())


def test_captioned_images_give_pixel_values_in_minus_one_one_and_padded_ids(tmp_path, tokenizer_dir):
    write_captioned(tmp_path, "train", 8)
    write_captioned(tmp_path, "val", 2, as_text_files=True, seed=1)
    bundle = build_datasets(
        {
            "source": "captioned-images",
            "path": str(tmp_path),
            "tokenizer": tokenizer_dir,
            "image_size": 16,
            "max_length": 12,
            "test_fraction": 0.25,
        }
    )
    assert bundle.sizes() == {"train": 6, "val": 2, "test": 2}
    assert bundle.input_shape == (3, 16, 16) and bundle.task == "text-to-image"
    sample = bundle.train[0]
    assert sample["pixel_values"].shape == (3, 16, 16) and sample["input_ids"].shape == (12,)
    assert -1.0 <= float(sample["pixel_values"].min()) < 0 < float(sample["pixel_values"].max()) <= 1.0
    batch = next(iter(DataLoader(bundle.train, batch_size=3)))
    assert batch["pixel_values"].shape == (3, 3, 16, 16) and batch["input_ids"].shape == (3, 12)
    from transformers import AutoTokenizer

    decoded = AutoTokenizer.from_pretrained(tokenizer_dir).decode(bundle.val[1]["input_ids"], skip_special_tokens=True)
    assert decoded == "a small painting number 1"


def test_captioned_images_list_format_and_integrity_errors(tmp_path, tokenizer_dir):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), "white").save(images / name)
    records = [{"file_name": "a.png", "text": "white square"}, {"image": "b.png", "caption": "another one"}]
    (tmp_path / "captions.json").write_text(json.dumps(records))
    settings = {
        "source": "captioned-images",
        "path": str(tmp_path),
        "tokenizer": tokenizer_dir,
        "val_fraction": 0,
        "test_fraction": 0,
        "max_length": 8,
    }
    bundle = build_datasets(settings)
    assert len(bundle.train) == 2 and float(bundle.train[0]["pixel_values"].min()) == 1.0
    Image.new("RGB", (8, 8)).save(images / "c.png")
    with pytest.raises(DataError, match=r"c\.png: no caption"):
        build_datasets(settings)
    (images / "c.png").unlink()
    (images / "b.png").unlink()
    with pytest.raises(DataError, match=r"caption for 'b.png', which is not in"):
        build_datasets(settings)
    with pytest.raises(ConfigError, match="data.tokenizer"):
        build_datasets({**settings, "tokenizer": None})


def test_csv_reading_edge_cases(tmp_path):
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncafé crème,a\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.csv: not UTF-8 text.*save it as UTF-8"):
        build_datasets({"source": "text-csv", "path": str(latin)})
    # Semicolons inside sentences do not confuse the delimiter; a quoted cell may span lines,
    # and an error after it names the line an editor shows.
    quoted = write_csv(
        tmp_path / "q.csv",
        ["text,label", '"one; two; three",a', '"first line', 'second line",b', '"fine; really",a', ",b"],
    )
    with pytest.raises(DataError, match=r"q.csv, line 6: empty text"):
        build_datasets({"source": "text-csv", "path": str(quoted)})


def test_text_csv_reads_multiline_cells_and_numeric_labels_in_order(tmp_path):
    rows = ['"a sentence; with a semicolon",10', '"a cell over\ntwo lines",2'] * 5
    path = write_csv(tmp_path / "t.csv", ["text,label", *rows])
    bundle = build_datasets({"source": "text-csv", "path": str(path), "val_fraction": 0, "test_fraction": 0})
    assert len(bundle.train) == 10
    assert bundle.class_names == ["2", "10"]  # numeric order, not "10" < "2"


def test_without_torchvision_augmentation_is_skipped_with_a_warning(monkeypatch):
    import tightfit.data.transforms as transforms

    monkeypatch.setattr(transforms, "is_available", lambda name: name != "torchvision")
    with pytest.warns(UserWarning, match=r"augmentation \['hflip:1'\] skipped.*tightfit\[vision\]"):
        bundle = build_datasets({"source": "digits", "augment": ["hflip:1"], "limit": 20})
    plain = build_datasets({"source": "digits", "limit": 20})
    assert bundle.train.transform is None
    assert torch.equal(bundle.train[0][0], plain.train[0][0])


def test_cache_true_uses_the_cache_directory_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TIGHTFIT_CACHE_DIR", str(tmp_path / "shared-cache"))
    root = write_image_folder(tmp_path / "images", classes=("a",), per_class=2)
    bundle = build_datasets(
        {"source": "image-folder", "path": str(root), "cache": True, "val_fraction": 0, "test_fraction": 0}
    )
    bundle.train[0]
    assert len(list((tmp_path / "shared-cache" / "images").rglob("*.safetensors"))) == 1
