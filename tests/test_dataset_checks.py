"""Dataset folder checks (`tightfit doctor --data`): every planted problem is found and named."""

import io
import itertools
import json
from pathlib import Path

import pytest
from PIL import Image

from tightfit.data import inspect as inspect_module
from tightfit.data.inspect import inspect_dataset
from tightfit.errors import TightfitError

_colors = itertools.count(1)


def write_image(path: Path, size=(12, 10), mode="RGB") -> Path:
    """A small PNG whose bytes differ from every other one written by the tests."""
    path.parent.mkdir(parents=True, exist_ok=True)
    value = next(_colors)
    color = (value % 256, (value // 256) % 256, 7) if mode == "RGB" else value % 256
    Image.new(mode, size, color).save(path)
    return path


def truncated_png(path: Path) -> Path:
    buffer = io.BytesIO()
    Image.effect_noise((96, 96), 64).convert("RGB").save(buffer, "PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])
    return path


def class_dataset(root: Path, splits=("train", "val", "test"), classes=("cat", "dog"), per_class=3) -> Path:
    for split in splits:
        for cls in classes:
            for index in range(per_class):
                write_image(root / split / cls / f"{cls}{index}.png")
    return root


def problems_of(report, kind):
    return [problem for problem in report["problems"] if problem["kind"] == kind]


def test_clean_class_dataset_has_no_problems(tmp_path):
    report = inspect_dataset(class_dataset(tmp_path / "data"))
    assert report["ok"] is True
    assert report["problems"] == []
    assert report["layout"] == "class-folders"
    assert report["missing_splits"] == []
    assert report["total_images"] == 18
    for split in ("train", "val", "test"):
        assert report["splits"][split]["images"] == 6
        assert report["splits"][split]["classes"] == {"cat": 3, "dog": 3}
    assert report["image_modes"] == {"RGB": 18}
    assert report["size_range"] == {"min_width": 12, "max_width": 12, "min_height": 10, "max_height": 10}


def test_corrupt_truncated_and_empty_images_are_named(tmp_path):
    root = class_dataset(tmp_path / "data")
    (root / "train" / "cat" / "notes.png").write_text("this is not a picture")
    truncated_png(root / "train" / "dog" / "cut.png")
    (root / "val" / "dog" / "empty.jpg").write_bytes(b"")
    (root / "train" / "cat" / "readme.md").write_text("ignored: not an image suffix")
    report = inspect_dataset(root)
    assert report["ok"] is False
    train_corrupt = {entry["file"] for entry in report["splits"]["train"]["corrupt"]}
    assert train_corrupt == {"train/cat/notes.png", "train/dog/cut.png"}
    val_corrupt = report["splits"]["val"]["corrupt"]
    assert [entry["file"] for entry in val_corrupt] == ["val/dog/empty.jpg"]
    assert "0 bytes" in val_corrupt[0]["error"]
    messages = " ".join(problem["message"] for problem in problems_of(report, "corrupt_images"))
    for name in ("train/cat/notes.png", "train/dog/cut.png", "val/dog/empty.jpg"):
        assert name in messages
    assert all(problem["severity"] == "error" for problem in problems_of(report, "corrupt_images"))
    # Corrupt files are still counted as files of their class.
    assert report["splits"]["train"]["classes"] == {"cat": 4, "dog": 4}


def test_empty_class_is_named(tmp_path):
    root = class_dataset(tmp_path / "data")
    (root / "train" / "bird").mkdir()
    report = inspect_dataset(root)
    assert report["splits"]["train"]["empty_classes"] == ["bird"]
    (problem,) = problems_of(report, "empty_classes")
    assert problem["split"] == "train" and "bird" in problem["message"] and problem["severity"] == "warning"
    # A train class absent from val/test is a warning there too.
    assert {problem["split"] for problem in problems_of(report, "absent_classes")} == {"val", "test"}


def test_class_only_in_validation_is_an_error(tmp_path):
    root = class_dataset(tmp_path / "data")
    write_image(root / "val" / "fox" / "fox0.png")
    report = inspect_dataset(root)
    (problem,) = problems_of(report, "unknown_classes")
    assert problem["severity"] == "error" and problem["split"] == "val" and "fox" in problem["message"]
    assert report["ok"] is False


def test_missing_splits_and_alternative_split_names(tmp_path):
    root = tmp_path / "data"
    class_dataset(root, splits=("train",))
    class_dataset(root, splits=("validation",))
    report = inspect_dataset(root)
    assert set(report["splits"]) == {"train", "val"}
    assert report["missing_splits"] == ["test"]
    assert problems_of(report, "missing_split")[0]["severity"] == "warning"
    assert report["ok"] is True


def test_unsplit_folder_of_classes(tmp_path):
    root = tmp_path / "data"
    for cls in ("a", "b"):
        for index in range(2):
            write_image(root / cls / f"{index}.png")
    report = inspect_dataset(root)
    assert list(report["splits"]) == ["all"]
    assert report["splits"]["all"]["classes"] == {"a": 2, "b": 2}
    assert report["missing_splits"] == [] and report["ok"] is True


def captioned_dataset(root: Path, splits=("train", "val", "test"), count=3) -> Path:
    """seed-003's layout: SPLIT/images/*.png and SPLIT/captions.json mapping file -> caption."""
    for split in splits:
        captions = {}
        for index in range(count):
            name = f"{split}_{index:04d}.png"
            write_image(root / split / "images" / name)
            captions[name] = f"a shoe, number {index}"
        (root / split / "captions.json").write_text(json.dumps(captions))
    return root


def test_clean_captioned_dataset(tmp_path):
    report = inspect_dataset(captioned_dataset(tmp_path / "shoes"))
    assert report["ok"] is True and report["problems"] == []
    assert report["layout"] == "captioned-images"
    train = report["splits"]["train"]
    assert train["images"] == 3 and train["classes"] is None
    assert train["captions"]["source"] == "captions.json" and train["captions"]["count"] == 3


def test_caption_mismatch_is_named(tmp_path):
    root = captioned_dataset(tmp_path / "shoes")
    captions_file = root / "train" / "captions.json"
    captions = json.loads(captions_file.read_text())
    del captions["train_0001.png"]
    captions["ghost.png"] = "a shoe nobody photographed"
    captions["train_0002.png"] = "   "
    captions_file.write_text(json.dumps(captions))
    report = inspect_dataset(root)
    assert report["ok"] is False
    train = report["splits"]["train"]["captions"]
    assert train["missing"] == ["train_0001.png"]
    assert train["orphaned"] == ["ghost.png"]
    assert train["empty"] == ["train_0002.png"]
    (missing,) = problems_of(report, "missing_captions")
    (orphaned,) = problems_of(report, "orphaned_captions")
    assert "train_0001.png" in missing["message"] and missing["severity"] == "error"
    assert "ghost.png" in orphaned["message"] and orphaned["severity"] == "error"
    assert problems_of(report, "empty_captions")[0]["severity"] == "warning"
    # The other splits are untouched.
    assert report["splits"]["val"]["captions"]["missing"] == []


def test_txt_captions_next_to_images(tmp_path):
    root = tmp_path / "pairs"
    for index in range(3):
        image = write_image(root / "train" / "images" / f"{index}.png")
        if index != 1:
            image.with_suffix(".txt").write_text(f"caption {index}")
    (root / "train" / "images" / "stray.txt").write_text("caption of an image that is not there")
    report = inspect_dataset(root)
    captions = report["splits"]["train"]["captions"]
    assert captions["source"] == "txt"
    assert captions["missing"] == ["1.png"]
    assert captions["orphaned"] == ["stray.txt"]
    assert report["ok"] is False


def test_metadata_jsonl_records(tmp_path):
    root = tmp_path / "hf"
    write_image(root / "train" / "a.png")
    write_image(root / "train" / "b.png")
    records = [{"file_name": "a.png", "text": "first"}, {"file_name": "c.png", "text": "third"}]
    (root / "train" / "metadata.jsonl").write_text("\n".join(json.dumps(record) for record in records))
    report = inspect_dataset(root)
    captions = report["splits"]["train"]["captions"]
    assert captions["source"] == "metadata.jsonl"
    assert captions["missing"] == ["b.png"] and captions["orphaned"] == ["c.png"]


def test_unreadable_caption_file_is_reported_not_raised(tmp_path):
    root = captioned_dataset(tmp_path / "shoes", splits=("train",))
    (root / "train" / "captions.json").write_text("{not json")
    report = inspect_dataset(root)
    (problem,) = problems_of(report, "caption_file")
    assert "captions.json" in problem["message"] and "not valid JSON" in problem["message"]
    assert report["ok"] is False


def test_duplicates_across_splits_are_found(tmp_path):
    root = class_dataset(tmp_path / "data")
    copy = root / "test" / "cat" / "copied.png"
    copy.write_bytes((root / "train" / "cat" / "cat0.png").read_bytes())
    report = inspect_dataset(root)
    assert report["duplicates_across_splits"] == [["test/cat/copied.png", "train/cat/cat0.png"]]
    (problem,) = problems_of(report, "duplicates_across_splits")
    assert problem["severity"] == "warning" and "train/cat/cat0.png" in problem["message"]


def test_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    report = inspect_dataset(tmp_path / "empty")
    assert report["ok"] is False
    assert problems_of(report, "no_images")
    assert problems_of(report, "empty_split")[0]["split"] == "train"


def test_bad_paths_raise_a_clear_error(tmp_path):
    with pytest.raises(TightfitError, match="does not exist"):
        inspect_dataset(tmp_path / "missing")
    file_path = tmp_path / "file.txt"
    file_path.write_text("x")
    with pytest.raises(TightfitError, match="is a file"):
        inspect_dataset(file_path)


def test_progress_reports_every_image(tmp_path):
    root = class_dataset(tmp_path / "data", splits=("train",), per_class=2)
    calls = []
    inspect_dataset(root, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (4, 4) and len(calls) == 4


def test_long_problem_lists_are_shortened_but_kept_whole(tmp_path):
    root = tmp_path / "data"
    for index in range(inspect_module.LISTED_FILES + 5):
        (root / "train" / "cat").mkdir(parents=True, exist_ok=True)
        (root / "train" / "cat" / f"bad{index:02d}.png").write_bytes(b"garbage")
    report = inspect_dataset(root)
    (problem,) = problems_of(report, "corrupt_images")
    assert len(problem["files"]) == inspect_module.LISTED_FILES + 5
    assert problem["message"].endswith("and 5 more")


def test_suffixes_and_split_names_match_the_image_folder_loader():
    from tightfit.data import image_folder

    assert inspect_module.IMAGE_SUFFIXES == image_folder.IMAGE_SUFFIXES
    assert inspect_module.SPLIT_FOLDERS == image_folder.SPLIT_FOLDERS
