"""Captioned images for text-to-image fine-tuning (the diffusion LoRA recipe).

The layout seed-003 prepares and checks::

    DATA/train/images/*.png   DATA/train/captions.json
    DATA/val/images/...       DATA/val/captions.json        (optional, as is test/)

or a single ``DATA/images/`` + ``DATA/captions.json`` split by fraction. ``captions.json`` is
either a mapping ``{"0001.png": "a caption", ...}`` (file name or stem) or a list of
``{"file_name": ..., "text": ...}`` records (``image``/``caption`` also accepted); without it,
each image may have a ``.txt`` file of the same stem beside it. Every image needs a caption and
every caption an image: a mismatch is an error naming the file, as seed-003's integrity check
would report it.

Samples are dicts ``{"pixel_values": float (3, H, W) in [-1, 1], "input_ids": int64
(max_length,)}``: captions are padded to the tokenizer's full context (77 for CLIP), as the
text encoder of Stable Diffusion expects. Images are decoded per item (cached when ``cache`` is
on) and augmented on the training split only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from tightfit.data.cache import TensorCache, describe, hash_bytes, resolve_cache_dir
from tightfit.data.config import DataConfig, DataError
from tightfit.data.image_folder import ImageDecoder, check_image_header, display_size, list_images
from tightfit.data.splits import limit_indices, split_indices
from tightfit.data.text import load_tokenizer, resolve_tokenizer_dir, tokenizer_fingerprint
from tightfit.errors import ConfigError

CLIP_CONTEXT_LENGTH = 77  # used when a tokenizer reports no sensible limit of its own
FILE_KEYS = ("file_name", "filename", "file", "image")
TEXT_KEYS = ("text", "caption")


def read_captions(folder: Path) -> list[tuple[Path, str]]:
    """``(image path, caption)`` pairs of one split folder (``images/`` + captions), sorted by file.

    Raises:
        DataError: an image without a caption, a caption without an image, a malformed
            ``captions.json``.
    """
    images_dir = folder / "images"
    if not images_dir.is_dir():
        raise DataError(f"{folder}: expected an images/ folder (and captions.json) inside it")
    images = list_images(images_dir)
    if not images:
        raise DataError(f"{images_dir}: no images")
    captions_file = folder / "captions.json"
    captions: dict[str, str] = {}
    if captions_file.is_file():
        try:
            raw = json.loads(captions_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DataError(f"{captions_file}: not valid JSON ({error})") from None
        if isinstance(raw, dict):
            captions = {str(name): str(text) for name, text in raw.items()}
        elif isinstance(raw, list):
            for number, record in enumerate(raw):
                name = next((record[key] for key in FILE_KEYS if isinstance(record, dict) and key in record), None)
                text = next((record[key] for key in TEXT_KEYS if isinstance(record, dict) and key in record), None)
                if name is None or text is None:
                    raise DataError(
                        f"{captions_file}, record {number}: needs a file ({'/'.join(FILE_KEYS)}) "
                        f"and a caption ({'/'.join(TEXT_KEYS)})"
                    )
                captions[str(name)] = str(text)
        else:
            raise DataError(f"{captions_file}: expected a mapping or a list of records")
    pairs, used = [], set()
    for image in images:
        relative = image.relative_to(images_dir).as_posix()
        name = next((key for key in (relative, image.name, image.stem) if key in captions), None)
        if name is not None:
            pairs.append((image, captions[name]))
            used.add(name)
        elif image.with_suffix(".txt").is_file():
            pairs.append((image, image.with_suffix(".txt").read_text(encoding="utf-8").strip()))
        else:
            raise DataError(f"{image}: no caption (not in {captions_file.name}, no {image.stem}.txt beside it)")
    orphans = sorted(set(captions) - used)
    if orphans:
        raise DataError(f"{captions_file}: caption for {orphans[0]!r}, which is not in {images_dir}")
    return pairs


class CaptionedImageDataset(Dataset):
    """Samples ``{"pixel_values", "input_ids"}`` (see the module doc).

    Args:
        paths: image files.
        input_ids: ``(N, max_length)`` tokenised captions.
        decoder: turns a path into uint8 RGB pixels of the training size.
        transform: augmentation on the ``[0, 1]`` image (training only), or ``None``.
    """

    in_memory = False

    def __init__(self, paths: list[Path], input_ids: torch.Tensor, decoder: ImageDecoder, transform=None):
        self.paths = paths
        self.input_ids = input_ids
        self.decoder = decoder
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = self.decoder(self.paths[index]).float() / 255.0
        if self.transform is not None:
            image = self.transform(image)
        return {"pixel_values": image * 2.0 - 1.0, "input_ids": self.input_ids[index]}


def _split_folders(root: Path) -> dict[str, Path]:
    return {split: root / split for split in ("train", "val", "test") if (root / split / "images").is_dir()}


def _tokenize_captions(
    captions: list[str], tokenizer, tokenizer_dir: Path, max_length: int, cache_dir: Path | None
) -> torch.Tensor:
    key = None
    if cache_dir is not None:
        cache = TensorCache(cache_dir, "tokens")
        content = hash_bytes(json.dumps(captions).encode())
        key = TensorCache.key(
            content, describe(kind="captions", tokenizer=tokenizer_fingerprint(tokenizer_dir), max_length=max_length)
        )
        cached = cache.load(key)
        if cached is not None:
            return cached["input_ids"]
    input_ids = tokenizer(captions, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")[
        "input_ids"
    ].to(torch.int64)
    if key is not None:
        cache.save(key, {"input_ids": input_ids})
    return input_ids


def build_captioned_images(config: DataConfig, seed: int):
    """The ``captioned-images`` source (see the module doc)."""
    from tightfit.data.bundle import DataBundle
    from tightfit.data.transforms import build_augmentation

    if config.path is None:
        raise ConfigError("data.path: the captioned-images source needs a folder (train/images + train/captions.json)")
    root = Path(config.path).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data.path: no such folder {root}")
    if config.tokenizer is None:
        raise ConfigError(
            "data.tokenizer: the captioned-images source needs the local tokenizer of the text encoder "
            "(the diffusers pipeline folder, or its tokenizer/ sub-folder)"
        )
    tokenizer_dir = resolve_tokenizer_dir(config.tokenizer)
    tokenizer = load_tokenizer(tokenizer_dir)
    split_seed = config.seed if config.seed is not None else seed

    folders = _split_folders(root)
    if "train" in folders:
        pool = read_captions(folders["train"])
    elif (root / "images").is_dir():
        pool = read_captions(root)
    else:
        raise DataError(f"{root}: expected train/images/ (or images/) with captions.json")
    train_idx, val_idx, test_idx = split_indices(
        len(pool),
        val_fraction=0.0 if "val" in folders else config.val_fraction,
        test_fraction=0.0 if "test" in folders else config.test_fraction,
        seed=split_seed,
    )
    pairs = {
        "train": [pool[i] for i in train_idx],
        "val": [pool[i] for i in val_idx],
        "test": [pool[i] for i in test_idx],
    }
    for split in ("val", "test"):
        if split in folders:
            pairs[split] = read_captions(folders[split])
    pairs = {
        split: [entries[i] for i in limit_indices(np.arange(len(entries)), config.limit, split_seed)]
        for split, entries in pairs.items()
    }
    for split_pairs in pairs.values():
        for path, _ in split_pairs:
            problem = check_image_header(path)
            if problem is not None:
                raise DataError(f"{path}: not a readable image ({problem})")

    if config.image_size is not None:
        size = (
            (config.image_size, config.image_size) if isinstance(config.image_size, int) else tuple(config.image_size)
        )
    else:
        size = display_size(pairs["train"][0][0])
    limit = (
        tokenizer.model_max_length
        if tokenizer.model_max_length and tokenizer.model_max_length < 10_000
        else CLIP_CONTEXT_LENGTH
    )
    max_length = config.max_length or limit
    cache_dir = resolve_cache_dir(config.cache)
    decoder = ImageDecoder("RGB", size, cache_dir)
    augmentation = build_augmentation(config.augment, size)

    def make(split: str, transform) -> CaptionedImageDataset | None:
        if not pairs[split]:
            return None
        captions = [caption for _, caption in pairs[split]]
        input_ids = _tokenize_captions(captions, tokenizer, tokenizer_dir, max_length, cache_dir)
        return CaptionedImageDataset([path for path, _ in pairs[split]], input_ids, decoder, transform)

    return DataBundle(
        train=make("train", augmentation),
        val=make("val", None),
        test=make("test", None),
        num_classes=None,
        input_shape=(3, *size),
        class_names=None,
        collate_fn=None,
        task="text-to-image",
        metadata={
            "source": "captioned-images",
            "root": str(root),
            "split_folders": {split: str(folder) for split, folder in folders.items()},
            "tokenizer": str(tokenizer_dir),
            "max_length": max_length,
            "split_seed": split_seed,
            "cache_dir": str(cache_dir) if cache_dir else None,
        },
    )
