"""On-the-fly augmentation for the training split, by name, through torchvision transforms v2.

Augmentations are named in the config (``augment: [random-crop, hflip, "rotation:15"]``); the
optional number after a colon is the one parameter each takes. They run on the float image
tensor ``(channels, height, width)`` after decoding (and after the cache), before
normalisation, and only on the training split: validation and test see the data as it is.

Without torchvision installed, augmentation is skipped with a warning: the run still works,
it just sees each image as it is.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from tightfit._optional import is_available

AUGMENTATIONS: dict[str, str] = {
    "random-crop": "pad by N pixels (default: an eighth of the side) and crop back at a random place",
    "random-resized-crop": "crop a random area of at least N of the image (default 0.8) and resize back",
    "hflip": "flip left-right with probability N (default 0.5)",
    "vflip": "flip upside-down with probability N (default 0.5)",
    "rotation": "rotate by up to ±N degrees (default 15)",
    "color-jitter": "vary brightness, contrast and saturation by up to N (default 0.2)",
    "random-erasing": "blank a random rectangle with probability N (default 0.25)",
    "gaussian-noise": "add Gaussian noise of standard deviation N (default 0.05)",
}
"""Every augmentation name the config accepts, with what its optional ``:N`` parameter means."""


def _split_name(spec: str) -> tuple[str, float | None]:
    name, _, parameter = spec.partition(":")
    name = name.strip().lower()
    if not parameter:
        return name, None
    try:
        return name, float(parameter)
    except ValueError:
        raise ValueError(f"augmentation {spec!r}: the part after ':' must be a number, e.g. 'rotation:15'") from None


def check_augmentation_name(spec: str) -> None:
    """Raise ``ValueError`` naming the valid augmentations when ``spec`` is not one of them.

    Used by :class:`~tightfit.data.config.DataConfig` validation, so it imports nothing heavy.
    """
    import difflib

    name, _ = _split_name(spec)
    if name not in AUGMENTATIONS:
        close = difflib.get_close_matches(name, list(AUGMENTATIONS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown augmentation {spec!r}{hint} (valid: {', '.join(AUGMENTATIONS)})")


def _make_one(spec: str, size: tuple[int, int], v2: Any) -> Any:
    name, value = _split_name(spec)
    if name == "random-crop":
        padding = int(value) if value is not None else max(1, min(size) // 8)
        return v2.RandomCrop(size, padding=padding, padding_mode="reflect")
    if name == "random-resized-crop":
        return v2.RandomResizedCrop(size, scale=(value if value is not None else 0.8, 1.0), antialias=True)
    if name == "hflip":
        return v2.RandomHorizontalFlip(p=value if value is not None else 0.5)
    if name == "vflip":
        return v2.RandomVerticalFlip(p=value if value is not None else 0.5)
    if name == "rotation":
        return v2.RandomRotation(degrees=value if value is not None else 15.0)
    if name == "color-jitter":
        strength = value if value is not None else 0.2
        return v2.ColorJitter(brightness=strength, contrast=strength, saturation=strength)
    if name == "random-erasing":
        return v2.RandomErasing(p=value if value is not None else 0.25)
    if name == "gaussian-noise":
        return v2.GaussianNoise(sigma=value if value is not None else 0.05, clip=False)
    check_augmentation_name(spec)  # raises with the list of valid names
    raise AssertionError(f"augmentation {name} is listed but not built")


def build_augmentation(specs: list[str], image_size: tuple[int, int]) -> Callable | None:
    """The training-split augmentation pipeline, or ``None`` when there is nothing to apply.

    Args:
        specs: augmentation names, each optionally with ``:N`` (see :data:`AUGMENTATIONS`).
        image_size: ``(height, width)`` of the images, for crops that keep the size.

    Returns:
        A callable taking and returning a float tensor ``(C, H, W)``, or ``None`` when ``specs``
        is empty or torchvision is not installed (a warning says so).

    Raises:
        ValueError: an unknown name (the config normally catches it first).
    """
    if not specs:
        return None
    for spec in specs:
        check_augmentation_name(spec)
    if not is_available("torchvision"):
        warnings.warn(
            f'augmentation {specs} skipped: torchvision is not installed (pip install "tightfit[vision]")',
            stacklevel=2,
        )
        return None
    from torchvision.transforms import v2

    return v2.Compose([_make_one(spec, tuple(image_size), v2) for spec in specs])
