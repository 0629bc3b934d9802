"""Check a dataset folder before training on it: splits, counts, corrupt images, captions.

What seed-003's ``check_dataset_paths`` did by hand (count images per split, compare with the
captions), done for every layout tightfit reads and with every problem named:

* splits ``train`` / ``val`` (``valid``, ``validation``) / ``test``, or one unsplit folder;
* images per split and per class (class sub-folders), empty classes, classes that exist in
  one split only;
* unreadable or corrupt images (each file named, with the decoder's reason), fully decoded, so
  a truncated file is caught too;
* captions, as ``captions.json`` (``{"0001.png": "a red shoe", ...}`` or a list of
  ``{"file_name", "text"}`` records), ``metadata.jsonl`` (Hugging Face image-folder style) or a
  ``.txt`` file next to each image: images without a caption, captions for missing images,
  empty captions;
* the same image file in two splits (leakage between train and test).

Only Pillow is needed (no torch), so ``tightfit doctor --data`` works even where torch is broken.

Example:
    >>> from tightfit.data.inspect import inspect_dataset
    >>> report = inspect_dataset("data/casual_shoes")
    >>> report["ok"], report["splits"]["train"]["images"]
"""

import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tightfit.errors import TightfitError

# The same suffixes and split folder names as tightfit.data.image_folder (a test keeps them equal);
# repeated here so this module does not import torch.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
CAPTION_FILES = ("captions.json", "metadata.jsonl")
LISTED_FILES = 20  # how many file names a problem's message shows (the report keeps them all)


def inspect_dataset(
    path: str | os.PathLike,
    *,
    decode: bool = True,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Inspect the dataset folder ``path`` and return a JSON-ready report.

    Args:
        path: the dataset root (with ``train/``, ``val/``, ``test/`` folders, or one unsplit
            folder of class sub-folders or images).
        decode: fully decode every image (catches truncated files); ``False`` reads headers only.
        workers: threads decoding images (default: up to 8, one per CPU).
        progress: called as ``progress(done, total)`` while images are checked.

    Returns:
        ``{"path", "layout", "splits": {name: split report}, "missing_splits", "total_images",
        "image_modes", "size_range", "duplicates_across_splits", "problems", "ok"}``. Each problem
        is ``{"severity": "error" | "warning", "split", "kind", "message", "files"}``; ``ok`` is
        true when no problem is an error.

    Raises:
        TightfitError: when ``path`` does not exist or is not a folder.
    """
    root = dataset_root(path)
    split_dirs = _find_splits(root)
    missing_splits = [name for name in SPLIT_FOLDERS if name not in split_dirs]
    if not split_dirs:
        split_dirs = {"all": root}
        missing_splits = []
    splits = {name: _scan_split(name, folder) for name, folder in split_dirs.items()}

    images = [(name, image) for name, split in splits.items() for image in split.pop("_images")]
    checked = _check_images([image for _name, image in images], decode, workers, progress)
    problems: list[dict[str, Any]] = []
    modes: dict[str, int] = {}
    widths, heights = [], []
    by_digest: dict[str, list[tuple[str, Path]]] = {}
    for (split_name, image), result in zip(images, checked):
        split = splits[split_name]
        if result["error"]:
            split["corrupt"].append({"file": _relative(image, root), "error": result["error"]})
            continue
        modes[result["mode"]] = modes.get(result["mode"], 0) + 1
        widths.append(result["size"][0])
        heights.append(result["size"][1])
        by_digest.setdefault(result["digest"], []).append((split_name, image))

    for name, split in splits.items():
        problems.extend(_split_problems(name, split))
    if missing_splits and "train" not in missing_splits:
        problems.append(
            _problem(
                "warning",
                None,
                "missing_split",
                f"no {' or '.join(missing_splits)} folder: tightfit carves those splits from train by fraction",
                [],
            )
        )
    if "train" in missing_splits and len(missing_splits) < len(SPLIT_FOLDERS):
        problems.append(
            _problem("error", None, "missing_split", "val/test folders but no train folder: nothing to train on", [])
        )
    problems.extend(_class_mismatch_problems(splits))

    duplicates = [
        sorted(_relative(image, root) for _name, image in entries)
        for entries in by_digest.values()
        if len({name for name, _image in entries}) > 1
    ]
    if duplicates:
        files = [" = ".join(group) for group in duplicates]
        problems.append(
            _problem(
                "warning",
                None,
                "duplicates_across_splits",
                f"{len(duplicates)} image(s) have an identical copy in another split, so evaluation sees "
                f"training data: {_names(files)}",
                [name for group in duplicates for name in group],
            )
        )

    total = sum(split["images"] for split in splits.values())
    if total == 0:
        problems.append(
            _problem("error", None, "no_images", f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {root}", [])
        )
    layout = _layout(splits)
    return {
        "path": str(root.absolute()),
        "layout": layout,
        "splits": splits,
        "missing_splits": missing_splits,
        "total_images": total,
        "image_modes": modes,
        "size_range": (
            {"min_width": min(widths), "max_width": max(widths), "min_height": min(heights), "max_height": max(heights)}
            if widths
            else None
        ),
        "duplicates_across_splits": duplicates,
        "problems": problems,
        "ok": not any(problem["severity"] == "error" for problem in problems),
    }


def dataset_root(path: str | os.PathLike) -> Path:
    """``path`` as a dataset folder, or a one-line error naming what is wrong with it.

    Raises:
        TightfitError: when ``path`` does not exist or is a file.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise TightfitError(f"--data: folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise TightfitError(f"--data: {str(root)!r} is a file, not a dataset folder")
    return root


# ----------------------------------------------------------------------------- layout


def _find_splits(root: Path) -> dict[str, Path]:
    children = {child.name.lower(): child for child in root.iterdir() if child.is_dir()}
    found = {}
    for split, names in SPLIT_FOLDERS.items():
        for name in names:
            if name in children:
                found[split] = children[name]
                break
    return found


def _scan_split(name: str, folder: Path) -> dict[str, Any]:
    """List a split's images and classes and read its captions (no decoding yet)."""
    images_dir = folder / "images" if (folder / "images").is_dir() else folder
    subdirs = sorted(child for child in images_dir.iterdir() if child.is_dir() and not child.name.startswith("."))
    direct_images = _list_images(images_dir, recursive=False)
    classes: dict[str, int] | None = None
    if subdirs and not direct_images and images_dir == folder:
        # Class sub-folders (ImageFolder layout); an empty folder is an empty class.
        classes = {}
        images: list[Path] = []
        for subdir in subdirs:
            class_images = _list_images(subdir, recursive=True)
            classes[subdir.name] = len(class_images)
            images.extend(class_images)
    else:
        images = _list_images(images_dir, recursive=True)
    split = {
        "path": str(folder),
        "images": len(images),
        "classes": classes,
        "empty_classes": sorted(cls for cls, count in (classes or {}).items() if count == 0),
        "corrupt": [],
        "captions": _read_captions(folder, images_dir, images),
        "_images": images,
    }
    return split


def _list_images(folder: Path, recursive: bool) -> list[Path]:
    files = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        path
        for path in files
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
    )


def _layout(splits: dict[str, dict[str, Any]]) -> str:
    if any(split["classes"] is not None for split in splits.values()):
        return "class-folders"
    if any(split["captions"]["source"] for split in splits.values()):
        return "captioned-images"
    return "images"


# ----------------------------------------------------------------------------- captions


def _read_captions(folder: Path, images_dir: Path, images: list[Path]) -> dict[str, Any]:
    """Match caption files to images; names the images without captions and the orphans."""
    report: dict[str, Any] = {"source": None, "count": 0, "missing": [], "orphaned": [], "empty": [], "error": None}
    caption_file = next(
        (
            candidate
            for directory in (folder, images_dir)
            for name in CAPTION_FILES
            if (candidate := directory / name).is_file()
        ),
        None,
    )
    image_keys = {_relative(image, images_dir): image for image in images}
    if caption_file is not None:
        report["source"] = (
            str(caption_file.relative_to(folder)) if caption_file.is_relative_to(folder) else str(caption_file)
        )
        try:
            captions = _load_caption_file(caption_file)
        except (OSError, ValueError) as error:
            report["error"] = f"{caption_file.name}: {error}"
            return report
        report["count"] = len(captions)
        matched = set()
        by_name = {Path(key).name: key for key in image_keys}
        by_stem = {Path(key).stem: key for key in image_keys}
        for key, caption in captions.items():
            image_key = key if key in image_keys else by_name.get(Path(key).name) or by_stem.get(Path(key).stem)
            if image_key is None:
                report["orphaned"].append(key)
                continue
            matched.add(image_key)
            if not str(caption).strip():
                report["empty"].append(image_key)
        report["missing"] = sorted(set(image_keys) - matched)
        return report

    text_files = sorted(path for path in images_dir.rglob("*.txt") if path.is_file())
    if not text_files:
        return report
    report["source"] = "txt"
    report["count"] = len(text_files)
    image_stems = {image.with_suffix(""): key for key, image in image_keys.items()}
    matched = set()
    for text_file in text_files:
        key = image_stems.get(text_file.with_suffix(""))
        if key is None:
            report["orphaned"].append(_relative(text_file, images_dir))
            continue
        matched.add(key)
        try:
            if not text_file.read_text(errors="replace").strip():
                report["empty"].append(key)
        except OSError:
            report["empty"].append(key)
    report["missing"] = sorted(set(image_keys) - matched)
    return report


def _load_caption_file(path: Path) -> dict[str, str]:
    """``captions.json`` (a mapping, or records) or ``metadata.jsonl`` as ``{file: caption}``."""
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"line {number}: {error.msg}") from None
    else:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"not valid JSON (line {error.lineno}: {error.msg})") from None
        if isinstance(data, dict):
            return {str(key): value if isinstance(value, str) else json.dumps(value) for key, value in data.items()}
        if not isinstance(data, list):
            raise ValueError("expected a mapping of file name to caption, or a list of records")
        records = data
    captions = {}
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"record {index} is not an object")
        name = record.get("file_name") or record.get("image") or record.get("file")
        text = record.get("text", record.get("caption", ""))
        if not name:
            raise ValueError(f"record {index} has no file_name")
        captions[str(name)] = str(text)
    return captions


# ----------------------------------------------------------------------------- images


def _check_images(
    images: list[Path], decode: bool, workers: int | None, progress: Callable[[int, int], None] | None
) -> list[dict[str, Any]]:
    total = len(images)
    if not total:
        return []
    workers = workers or min(8, os.cpu_count() or 1)
    results = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done, result in enumerate(pool.map(lambda image: _check_image(image, decode), images), start=1):
            results.append(result)
            if progress is not None:
                progress(done, total)
    return results


def _check_image(path: Path, decode: bool) -> dict[str, Any]:
    """Open (and decode) one image: its mode, size and content digest, or why it cannot be read."""
    import io

    from PIL import Image

    result: dict[str, Any] = {"error": None, "mode": None, "size": None, "digest": None}
    try:
        data = path.read_bytes()
    except OSError as error:
        result["error"] = f"unreadable: {error.strerror or error}"
        return result
    if not data:
        result["error"] = "empty file (0 bytes)"
        return result
    result["digest"] = hashlib.blake2b(data, digest_size=16).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as image:
            result["mode"], result["size"] = image.mode, image.size
            if decode:
                image.load()  # verify() alone misses truncated pixel data
            else:
                image.verify()
    except Exception as error:  # noqa: BLE001 - Pillow raises many types for bad files; all mean "corrupt"
        result["error"] = f"{type(error).__name__}: {error}"
    return result


# ----------------------------------------------------------------------------- problems


def _split_problems(name: str, split: dict[str, Any]) -> list[dict[str, Any]]:
    problems = []
    if split["corrupt"]:
        files = [entry["file"] for entry in split["corrupt"]]
        problems.append(
            _problem(
                "error", name, "corrupt_images", f"{len(files)} unreadable or corrupt image(s): {_names(files)}", files
            )
        )
    if split["images"] == 0:
        problems.append(
            _problem(
                "error" if name in ("train", "all") else "warning",
                name,
                "empty_split",
                f"split {name} has no images",
                [],
            )
        )
    if split["empty_classes"]:
        problems.append(
            _problem(
                "warning",
                name,
                "empty_classes",
                f"{len(split['empty_classes'])} empty class folder(s): {_names(split['empty_classes'])}",
                split["empty_classes"],
            )
        )
    captions = split["captions"]
    if captions["error"]:
        problems.append(_problem("error", name, "caption_file", f"cannot read captions: {captions['error']}", []))
    if captions["missing"]:
        problems.append(
            _problem(
                "error",
                name,
                "missing_captions",
                f"{len(captions['missing'])} image(s) without a caption: {_names(captions['missing'])}",
                captions["missing"],
            )
        )
    if captions["orphaned"]:
        problems.append(
            _problem(
                "error",
                name,
                "orphaned_captions",
                f"{len(captions['orphaned'])} caption(s) for images that do not exist: {_names(captions['orphaned'])}",
                captions["orphaned"],
            )
        )
    if captions["empty"]:
        problems.append(
            _problem(
                "warning",
                name,
                "empty_captions",
                f"{len(captions['empty'])} empty caption(s): {_names(captions['empty'])}",
                captions["empty"],
            )
        )
    return problems


def _class_mismatch_problems(splits: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Classes present in train but absent from val/test (or the reverse) shift the label set."""
    train = splits.get("train")
    if not train or train["classes"] is None:
        return []
    train_classes = set(train["classes"])
    problems = []
    for name, split in splits.items():
        if name == "train" or split["classes"] is None:
            continue
        only_here = sorted(set(split["classes"]) - train_classes)
        if only_here:
            problems.append(
                _problem(
                    "error", name, "unknown_classes", f"class folder(s) not in train: {_names(only_here)}", only_here
                )
            )
        absent = sorted(train_classes - set(split["classes"]))
        if absent:
            problems.append(
                _problem(
                    "warning", name, "absent_classes", f"train class(es) with no folder here: {_names(absent)}", absent
                )
            )
    return problems


def _problem(severity: str, split: str | None, kind: str, message: str, files: list[str]) -> dict[str, Any]:
    where = f"{split}: " if split else ""
    return {"severity": severity, "split": split, "kind": kind, "message": where + message, "files": files}


def _names(files: list[str]) -> str:
    shown = ", ".join(files[:LISTED_FILES])
    return shown + (f" and {len(files) - LISTED_FILES} more" if len(files) > LISTED_FILES else "")


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
