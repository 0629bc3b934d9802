"""The built-in data set: scikit-learn's bundled handwritten digits (no download).

1,797 real 8×8 greyscale images of the digits 0–9 (pixel values 0–16), shipped inside
scikit-learn. Samples are ``(float32 tensor (1, 8, 8), int64 label)``; pixels are scaled to
``[0, 1]`` (``normalize: unit``, the default) or standardised per pixel channel on the training
split (``normalize: standard``). Split by fraction, stratified, with a fixed seed.
"""

from __future__ import annotations

from tightfit.data.config import DataConfig
from tightfit.data.tensors import bundle_from_arrays

DIGITS_PIXEL_MAX = 16  # sklearn's digits are 4-bit intensities


def build_digits(config: DataConfig, seed: int):
    """Build the digits bundle (see the module doc)."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None, :, :]  # (1797, 1, 8, 8)
    normalize = "unit" if config.normalize == "auto" else config.normalize
    if normalize == "unit":
        images = images / DIGITS_PIXEL_MAX
        normalize = "none"  # already scaled; bundle_from_arrays only scales integer inputs
    bundle = bundle_from_arrays(
        images,
        digits.target.astype(np.int64),
        config,
        seed,
        class_names=[str(name) for name in digits.target_names],
        normalize=normalize,
        source="digits",
    )
    if config.normalize in ("auto", "unit"):
        bundle.metadata["normalization"] = {"mode": "unit", "scale": DIGITS_PIXEL_MAX}
    return bundle
