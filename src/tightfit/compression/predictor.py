"""Run an exported model on new inputs without the training code (``tightfit predict``).

An artifact is an ONNX file (run with ONNX Runtime) or a ``torch.export`` program (``.pt2``, run
with ``torch.export.load`` alone). Both carry tightfit metadata written at export time: class
names, the input shape, the pixel normalisation and, for text models, the tokenizer directory.

Inputs are images (resized to the model's input size, scaled as in training), tensor files
(``.npy`` read without pickle, ``.pt`` read with ``weights_only=True``: no code runs) or text.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tightfit._optional import require
from tightfit.errors import ConfigError
from tightfit.trust import check_program

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
TENSOR_SUFFIXES = {".npy", ".pt", ".pth"}


@dataclass
class Artifact:
    """A loaded model ready to run: ``run(feeds) -> outputs`` plus its metadata."""

    path: Path
    kind: str  # "onnx" or "program"
    input_names: list[str]
    input_types: list[str]  # numpy dtype names
    metadata: dict[str, Any]
    _runner: Any

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The model's main output for the given numpy inputs."""
        return self._runner(feeds)


def resolve_artifact(path: str | os.PathLike) -> Path:
    """The model file for ``path``: the file itself, or in a compress output folder the best
    ONNX/.pt2 artifact named by ``report.json`` (else the first ``model.onnx`` found).

    Raises:
        ConfigError: when nothing runnable is there.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix not in (".onnx", ".pt2"):
            raise ConfigError(f"predict: {path} is not an .onnx or .pt2 file")
        return path
    if not path.is_dir():
        raise ConfigError(f"predict: artifact {path} does not exist")
    report = path / "report.json"
    if report.is_file():
        try:
            payload = json.loads(report.read_text(encoding="utf-8"))
            fastest = payload.get("best", {}).get("fastest")
            records = [record for record in payload.get("artifacts", []) if isinstance(record, dict)]
        except (ValueError, AttributeError) as error:  # not JSON, not UTF-8, or not the report's shape
            raise ConfigError(
                f"predict: {report} is damaged ({type(error).__name__}); give the model file itself "
                f"(an .onnx under {path})"
            ) from None
        for record in records:
            if (
                record.get("name") == fastest
                and record.get("format") == "onnx"
                and Path(str(record.get("artifact"))).is_file()
            ):
                return Path(record["artifact"])
    candidates = sorted(path.rglob("model.onnx")) or sorted(path.rglob("model.pt2"))
    if not candidates:
        raise ConfigError(f"predict: no model.onnx or model.pt2 under {path}")
    return candidates[-1]


def load_artifact(path: str | os.PathLike, *, threads: int | None = None, trust_pt2: bool = False) -> Artifact:
    """Load an ONNX file or a ``.pt2`` program for inference on CPU.

    Args:
        path: the file, or a compress output folder.
        threads: inference threads.
        trust_pt2: load a ``.pt2`` this machine's ``compress`` did not write (loading one can run
            code inside it; see ``tightfit.trust``).

    Raises:
        ConfigError: on a missing or unreadable file, or an untrusted ``.pt2``.
    """
    path = resolve_artifact(path)
    if path.suffix == ".onnx":
        from tightfit.compression.benchmark import ort_session
        from tightfit.compression.export import read_metadata

        try:
            session = ort_session(path, threads=threads, best_device=True)
        except Exception as error:  # onnxruntime raises its own exception types
            raise ConfigError(
                f"predict: {path} cannot be loaded by ONNX Runtime: {str(error).splitlines()[0]}"
            ) from None
        inputs = session.get_inputs()
        types = [_ort_dtype(item.type) for item in inputs]
        return Artifact(
            path,
            "onnx",
            [item.name for item in inputs],
            types,
            read_metadata(path),
            lambda feeds: session.run(None, feeds)[0],
        )
    check_program(path, trust_pt2=trust_pt2)
    import torch

    from tightfit.compression.export import PROGRAM_METADATA

    extra = {PROGRAM_METADATA: ""}
    # torch.export logs the whole failure at WARNING before raising it; the one-line error says it
    export_log = logging.getLogger("torch.export")
    level = export_log.level
    export_log.setLevel(logging.ERROR)
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as error:  # torch.export.load raises many types on bad archives
        raise ConfigError(
            f"predict: {path} is not a readable torch.export program: {str(error).splitlines()[0]}"
        ) from None
    finally:
        export_log.setLevel(level)
    module = program.module()
    names = [spec.arg.name for spec in program.graph_signature.input_specs if spec.kind.name == "USER_INPUT"]
    metadata = json.loads(extra[PROGRAM_METADATA] or "{}")
    types = ["float32" if not metadata.get("text") else "int64" for _ in names]

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        from tightfit.step.loss import model_output_tensor

        with torch.inference_mode():
            tensors = [torch.from_numpy(feeds[name]) for name in names]
            return model_output_tensor(module(*tensors)).float().numpy()

    return Artifact(path, "program", names, types, metadata, run)


def _ort_dtype(type_name: str) -> str:
    return {
        "tensor(float)": "float32",
        "tensor(int64)": "int64",
        "tensor(int32)": "int32",
        "tensor(double)": "float64",
        "tensor(float16)": "float16",
    }.get(type_name, "float32")


def load_inputs(
    artifact: Artifact, inputs: list[str], *, text: bool = False, tokenizer: str | None = None
) -> tuple[list[str], dict[str, np.ndarray]]:
    """Read the inputs into one batch of feeds.

    Args:
        artifact: the loaded model (its metadata says the input size and normalisation).
        inputs: file paths (images, .npy, .pt), or sentences when ``text``.
        text: treat every input as a sentence for a text model.
        tokenizer: a local tokenizer directory (default: the one in the metadata).

    Returns:
        ``(labels, feeds)``: a name per sample, and the feed dictionary.

    Raises:
        ConfigError: a missing file, an unsupported suffix, or a shape the model cannot take.
    """
    if text:
        return _text_feeds(artifact, inputs, tokenizer)
    samples, labels = [], []
    for item in inputs:
        path = Path(item)
        if not path.is_file():
            raise ConfigError(f"predict: input {item} does not exist (pass --text for sentences)")
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            array = _read_image(path, artifact.metadata)
            samples.append(array[None])
            labels.append(str(path))
        elif suffix in TENSOR_SUFFIXES:
            array = _read_tensor(path)
            shape = artifact.metadata.get("input_shape")
            if shape and list(array.shape) == list(shape):
                array = array[None]
            samples.append(array)
            labels += [f"{path}[{index}]" for index in range(len(array))] if len(array) > 1 else [str(path)]
        else:
            raise ConfigError(
                f"predict: {path} has an unsupported type {suffix or '(none)'}; use images "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}) or tensor files (.npy, .pt)"
            )
    try:
        batch = np.concatenate(samples).astype(artifact.input_types[0])
    except ValueError as error:
        raise ConfigError(f"predict: inputs of different shapes cannot form one batch ({error})") from None
    expected = artifact.metadata.get("input_shape")
    if expected and list(batch.shape[1:]) != list(expected):
        raise ConfigError(f"predict: the model takes inputs of shape {expected}; got {list(batch.shape[1:])}")
    return labels, {artifact.input_names[0]: batch}


def _read_image(path: Path, metadata: dict[str, Any]) -> np.ndarray:
    """An image file as the model's input: the artifact's preprocessing (``metadata["preprocessing"]``,
    written by ``compress`` from the training data) applied, the way the training data looked.

    Greyscale or RGB as the model takes it; the polarity flipped when the model learnt light
    strokes on a dark background and the image is the other way round (a pen drawing); cropped to
    the strokes and padded square when the training images' strokes fill the frame and the
    image's do not; reduced to the model's size by area averaging; scaled as in training. An
    input whose statistics still lie far outside the training ones gets a warning.
    """
    from PIL import Image, UnidentifiedImageError

    shape = metadata.get("input_shape") or [3, 224, 224]
    channels, height, width = shape[-3], shape[-2], shape[-1]
    preprocessing = metadata.get("preprocessing") or {}
    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            array = np.asarray(image, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as error:
        raise ConfigError(f"predict: {path} is not a readable image ({error})") from None
    if preprocessing.get("polarity") == "light-on-dark" and np.median(array) > 0.5:
        array = 1.0 - array  # dark strokes on a light page: the model learnt the opposite
    if preprocessing.get("ink_extent", 0) >= 0.8:
        array = _fit_strokes(array, preprocessing["ink_extent"])
    resized = Image.fromarray(np.uint8(np.clip(array, 0, 1) * 255))
    resized = resized.resize((width, height), Image.BOX if resized.width >= width else Image.BILINEAR)
    array = np.asarray(resized, dtype=np.float32) / 255.0  # "unit" normalisation, as in training
    array = array[None] if channels == 1 else array.transpose(2, 0, 1)
    normalization = metadata.get("normalization") or {}
    if normalization.get("mode") == "standard" and "mean" in normalization and "std" in normalization:
        mean = np.asarray(normalization["mean"], dtype=np.float32).reshape(-1, 1, 1)
        std = np.asarray(normalization["std"], dtype=np.float32).reshape(-1, 1, 1)
        array = (array - mean) / std
    _warn_if_unlike_training(path, array, preprocessing)
    return array


OUT_OF_DISTRIBUTION_SPREADS = 4  # an image mean this many training spreads from the training mean is warned about


def _fit_strokes(array: np.ndarray, extent: float) -> np.ndarray:
    """Crop to the strokes (pixels above a quarter of the brightest) and pad square, so they span
    ``extent`` of the frame as in training."""
    grey = array if array.ndim == 2 else array.mean(axis=2)
    ink = grey > 0.25 * grey.max() if grey.max() > 0 else grey > 1
    rows, columns = np.nonzero(ink.any(axis=1))[0], np.nonzero(ink.any(axis=0))[0]
    if len(rows) == 0:
        return array
    cropped = array[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]
    side = int(round(max(cropped.shape[:2]) / extent))
    padded = np.zeros((side, side) + cropped.shape[2:], dtype=array.dtype)
    top, left = (side - cropped.shape[0]) // 2, (side - cropped.shape[1]) // 2
    padded[top : top + cropped.shape[0], left : left + cropped.shape[1]] = cropped
    return padded


def _warn_if_unlike_training(path: Path, array: np.ndarray, preprocessing: dict) -> None:
    if not preprocessing.get("mean_spread"):
        return
    mean, spread = preprocessing["mean"], preprocessing["mean_spread"]
    distance = abs(float(array.mean()) - mean) / spread
    if distance > OUT_OF_DISTRIBUTION_SPREADS:
        warnings.warn(
            f"{path}: after preprocessing its mean value is {array.mean():.3g}, {distance:.0f} spreads from the "
            f"training images' {mean:.3g} (spread {spread:.2g}): the prediction is likely unreliable",
            stacklevel=3,
        )


def _read_tensor(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as error:
            raise ConfigError(f"predict: {path} is not a plain numpy array file ({error})") from None
    import torch

    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors of many kinds; weights_only refuses code
        raise ConfigError(
            f"predict: {path} is not a tensor file torch can load safely ({str(error).splitlines()[0]})"
        ) from None
    if not isinstance(value, torch.Tensor):
        raise ConfigError(f"predict: {path} holds a {type(value).__name__}, not a tensor")
    return value.float().numpy() if value.is_floating_point() else value.numpy()


def _text_feeds(
    artifact: Artifact, sentences: list[str], tokenizer: str | None
) -> tuple[list[str], dict[str, np.ndarray]]:
    transformers = require("transformers", extra="hf", purpose="tokenizing text for prediction")
    directory = tokenizer or artifact.metadata.get("tokenizer")
    if not directory or not Path(directory).is_dir():
        raise ConfigError("predict: a text model needs its tokenizer: pass --tokenizer DIR (a local folder)")
    try:  # the folder comes from the artifact's metadata: never run its Python files (auto_map)
        tokenizer_object = transformers.AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"predict: tokenizer {directory} cannot be loaded: {str(error).strip().splitlines()[0]}"
        ) from None
    encoded = tokenizer_object(sentences, padding=True, truncation=True, return_tensors="np")
    feeds = {}
    for name, dtype in zip(artifact.input_names, artifact.input_types):
        if name not in encoded:
            raise ConfigError(f"predict: the model wants input {name!r}, which the tokenizer does not produce")
        feeds[name] = encoded[name].astype(dtype)
    return list(sentences), feeds


def predict(
    artifact: str | os.PathLike | Artifact,
    inputs: list[str],
    *,
    top_k: int = 3,
    text: bool = False,
    tokenizer: str | None = None,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Predict for each input: the top-k classes (with names when known) or the output vector.

    Returns:
        One dict per sample: ``{"input", "top": [{"class", "name", "probability"}]}`` for
        classifiers, ``{"input", "output": [...], "shape": [...]}`` otherwise.

    Raises:
        ConfigError: bad artifact or inputs.
    """
    if not inputs:
        raise ConfigError("predict: give at least one input")
    if top_k < 1:
        raise ConfigError(f"predict: --top-k must be at least 1; got {top_k}")
    model = artifact if isinstance(artifact, Artifact) else load_artifact(artifact, threads=threads)
    labels, feeds = load_inputs(model, inputs, text=text, tokenizer=tokenizer)
    output = np.asarray(model.run(feeds), dtype=np.float32)
    names = model.metadata.get("class_names")
    results = []
    for index, label in enumerate(labels):
        row = output[index]
        if row.ndim == 1 and (names or model.metadata.get("task", "") in ("classification", "text-classification")):
            shifted = np.exp(row - row.max())
            probabilities = shifted / shifted.sum()
            order = np.argsort(-probabilities)[:top_k]
            top = [
                {
                    "class": int(c),
                    "name": names[c] if names and c < len(names) else str(int(c)),
                    "probability": float(probabilities[c]),
                }
                for c in order
            ]
            results.append({"input": label, "top": top})
        else:
            results.append({"input": label, "shape": list(row.shape), "output": row.reshape(-1).tolist()})
    return results
