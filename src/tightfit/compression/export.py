"""Export for deployment: ONNX (dynamic batch), ONNX Runtime int8, and ``torch.export`` programs.

Nothing is kept unverified: every exported file is run on real inputs and compared with the
PyTorch model it came from (largest absolute difference of the outputs, and how often the top-1
class agrees). A file that disagrees beyond tolerance is deleted and the step fails loudly.

The ONNX file carries what ``tightfit predict`` needs to use it without the training code, as
metadata: the class names, the input layout (image channels and size, or token inputs) and the
tokenizer directory for text models.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from tightfit._optional import require
from tightfit.errors import ConfigError, TightfitError
from tightfit.trust import record_program

METADATA_PREFIX = "tightfit."
PROGRAM_METADATA = "tightfit.json"


class VerificationError(TightfitError):
    """An exported model's outputs disagree with the PyTorch model's beyond tolerance."""


@dataclass
class Verification:
    """How an exported model's outputs compare with the reference PyTorch model's.

    Attributes:
        samples: inputs compared.
        max_abs_diff: the largest absolute difference over all outputs.
        top1_agreement: fraction of samples whose arg-max class agrees (``None`` when the output
            is not a ``(batch, classes)`` score matrix).
        cosine: mean cosine similarity of the flattened per-sample outputs.
        passed: whether the thresholds given to :func:`verify_onnx` held.
    """

    samples: int
    max_abs_diff: float
    top1_agreement: float | None
    cosine: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _inputs_of(batch: Any) -> tuple[tuple, dict]:
    from tightfit.step.loss import split_batch

    args, kwargs, _ = split_batch(batch)
    kwargs = {key: value for key, value in kwargs.items() if key != "labels"}
    return tuple(args), kwargs


def _tracing_inputs(batch: Any) -> tuple[tuple, dict]:
    """CPU inputs for tracing, with at least two samples: torch.export specialises a batch axis
    of size 1 to a constant, which would defeat the dynamic batch."""
    args, kwargs = _inputs_of(batch)

    def widen(value: torch.Tensor) -> torch.Tensor:
        value = value.detach().cpu()
        return torch.cat([value, value]) if value.ndim and value.shape[0] == 1 else value

    return tuple(widen(value) for value in args), {key: widen(value) for key, value in kwargs.items()}


def input_names_of(batch: Any) -> list[str]:
    """The ONNX input names for a batch: ``input`` (or ``input_0``, ...) or the keyword names."""
    args, kwargs = _inputs_of(batch)
    if kwargs:
        return list(kwargs)
    return ["input"] if len(args) == 1 else [f"input_{index}" for index in range(len(args))]


def onnx_feeds(batch: Any) -> dict[str, np.ndarray]:
    """The numpy feed dictionary of a batch for an ONNX model exported by :func:`export_onnx`."""
    args, kwargs = _inputs_of(batch)
    values = list(kwargs.values()) if kwargs else list(args)
    return {name: value.detach().cpu().numpy() for name, value in zip(input_names_of(batch), values)}


def _dynamic_shapes(args: tuple, kwargs: dict) -> tuple | dict:
    """Batch axis dynamic for every input; the sequence axis too for 2-D integer (token) inputs."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    sequence = torch.export.Dim("sequence", min=1, max=65536)

    def shape(tensor: torch.Tensor) -> dict[int, Any]:
        axes: dict[int, Any] = {0: batch}
        if tensor.ndim == 2 and not tensor.is_floating_point():
            axes[1] = sequence
        return axes

    if kwargs:
        return {name: shape(value) for name, value in kwargs.items()}
    return tuple(shape(value) for value in args)


def export_onnx(
    model: nn.Module,
    example_batch: Any,
    path: str | os.PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
    opset_version: int | None = None,
) -> Path:
    """Export a float model to one self-contained ONNX file with a dynamic batch axis.

    Uses the ``torch.export``-based (dynamo) exporter, and falls back to the TorchScript exporter
    for models ``torch.export`` cannot capture.

    Args:
        model: a float PyTorch model (torch.ao-quantized models do not export; export the float
            model and quantize it with :func:`quantize_onnx` instead).
        example_batch: one batch in a form the loss rule accepts (``labels``/targets are ignored).
        path: the ``.onnx`` file to write (its folder is created).
        metadata: written into the file as ``tightfit.<key>`` metadata (JSON-encoded values).
        opset_version: ONNX opset (default: the exporter's).

    Returns:
        The path written.

    Raises:
        ConfigError: when neither exporter can handle the model.
    """
    require("onnxscript", extra="onnx", purpose="ONNX export")
    onnx = require("onnx", extra="onnx", purpose="ONNX export")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # torch.export leaves traces on the module it captured (a later FX static quantization of that
    # same module ran 1.6x slower in benchmarks/compression.py); export a copy instead.
    model = copy.deepcopy(model).cpu().eval()
    args, kwargs = _tracing_inputs(example_batch)
    names = input_names_of(example_batch)
    errors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for dynamo in (True, False):
            try:
                _run_exporter(model, args, kwargs, path, names, dynamo, opset_version)
                break
            except Exception as error:  # exporters raise many types; report them all at the end
                errors.append(
                    f"{'dynamo' if dynamo else 'torchscript'}: {type(error).__name__}: {error}".splitlines()[0]
                )
        else:
            raise ConfigError(f"export: the model could not be exported to ONNX ({'; '.join(errors)})")
    proto = onnx.load(str(path))
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key = METADATA_PREFIX + key
        entry.value = json.dumps(value)
    onnx.save(proto, str(path))
    data_file = path.with_name(path.name + ".data")
    if data_file.exists():  # weights were inlined by onnx.save above
        data_file.unlink()
    return path


def _run_exporter(model, args, kwargs, path, names, dynamo, opset_version) -> None:
    import contextlib
    import io

    options: dict[str, Any] = {"input_names": names, "output_names": ["output"]}
    if opset_version:
        options["opset_version"] = opset_version
    if dynamo:
        options.update(dynamic_shapes=_dynamic_shapes(args, kwargs), external_data=False)
    else:
        reference = kwargs or dict(zip(names, args))
        options["dynamic_axes"] = {
            name: ({0: "batch", 1: "sequence"} if value.ndim == 2 and not value.is_floating_point() else {0: "batch"})
            for name, value in reference.items()
        }
    # The dynamo exporter narrates its progress on stdout; keep the command's output clean.
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(model, args, str(path), kwargs=kwargs or None, dynamo=dynamo, **options)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``tightfit.*`` metadata of an ONNX file, decoded (without loading its weights)."""
    onnx = require("onnx", extra="onnx", purpose="reading ONNX files")
    proto = onnx.load(str(path), load_external_data=False)
    found = {}
    for entry in proto.metadata_props:
        if entry.key.startswith(METADATA_PREFIX):
            try:
                found[entry.key[len(METADATA_PREFIX) :]] = json.loads(entry.value)
            except json.JSONDecodeError:
                found[entry.key[len(METADATA_PREFIX) :]] = entry.value
    return found


class _FeedReader:
    """ONNX Runtime's calibration data reader protocol over a list of feed dictionaries."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._iterator = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iterator, None)


def quantize_onnx(
    source: str | os.PathLike,
    target: str | os.PathLike,
    *,
    method: Literal["static", "dynamic"],
    calibration_feeds: Iterable[dict[str, np.ndarray]] = (),
    per_channel: bool = True,
) -> Path:
    """Quantize an ONNX model to int8 with ONNX Runtime.

    Args:
        source: the fp32 ONNX file.
        target: the int8 file to write.
        method: ``static`` (QDQ, weights and activations int8, activation ranges calibrated on
            ``calibration_feeds``; for CNNs) or ``dynamic`` (int8 weights, activations quantized
            at run time; for transformers and MLPs — on CNNs it is slower, onnxruntime #12854).
        calibration_feeds: feed dictionaries drawn from the training data, for ``static``.
        per_channel: per-channel weight scales (more accurate for convolutions).

    Returns:
        The path written.

    Raises:
        ConfigError: on an unknown method or no calibration data for ``static``.
    """
    quantization = require("onnxruntime.quantization", extra="onnx", purpose="ONNX int8 quantization")
    source, target = Path(source).resolve(), Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    prepared = target.with_name(target.stem + ".pre.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            # Shape inference and graph cleanup first, as ONNX Runtime recommends. Its symbolic
            # shape inference writes scratch files (sym_shape_infer_temp.onnx, <uuid>.data) into
            # the working directory, so it runs in a scratch folder of its own.
            with tempfile.TemporaryDirectory(prefix="tightfit-ort-") as scratch, _working_directory(scratch):
                quantization.quant_pre_process(str(source), str(prepared), skip_symbolic_shape=False)
        except Exception:  # pre-processing is an optimisation; quantize the raw graph if it fails
            prepared = source
        try:
            if method == "static":
                feeds = list(calibration_feeds)
                if not feeds:
                    raise ConfigError("export: static ONNX int8 needs calibration data; none was given")
                quantization.quantize_static(
                    str(prepared),
                    str(target),
                    _FeedReader(feeds),
                    quant_format=quantization.QuantFormat.QDQ,
                    per_channel=per_channel,
                    activation_type=quantization.QuantType.QUInt8,
                    weight_type=quantization.QuantType.QInt8,
                )
            elif method == "dynamic":
                quantization.quantize_dynamic(
                    str(prepared),
                    str(target),
                    per_channel=per_channel,
                    weight_type=quantization.QuantType.QInt8,
                )
            else:
                raise ConfigError(f"export: ONNX int8 method must be 'static' or 'dynamic'; got {method!r}")
        finally:
            if prepared != source and prepared.exists():
                prepared.unlink()
    _copy_metadata(source, target)
    return target


@contextlib.contextmanager
def _working_directory(path: str):
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _copy_metadata(source: Path, target: Path) -> None:
    onnx = require("onnx", extra="onnx", purpose="ONNX export")
    source_proto = onnx.load(str(source), load_external_data=False)
    target_proto = onnx.load(str(target))
    keys = {entry.key for entry in target_proto.metadata_props}
    for entry in source_proto.metadata_props:
        if entry.key not in keys:
            target_proto.metadata_props.add(key=entry.key, value=entry.value)
    onnx.save(target_proto, str(target))


@torch.no_grad()
def verify_onnx(
    path: str | os.PathLike,
    reference: nn.Module,
    batches: Iterable[Any],
    *,
    max_abs_diff: float | None = 1e-3,
    min_top1_agreement: float | None = 0.99,
    min_cosine: float | None = None,
    threads: int | None = None,
    delete_on_failure: bool = True,
) -> Verification:
    """Compare an ONNX model's outputs with the PyTorch model's on real batches.

    Args:
        path: the ONNX file.
        reference: the PyTorch model it should reproduce.
        batches: real batches (held-out data), any form the loss rule accepts.
        max_abs_diff: fail when the largest difference, relative to the reference outputs' largest
            magnitude, exceeds this (``None``: not checked; int8 models are checked by agreement).
        min_top1_agreement: fail when fewer samples agree on the top-1 class (classifiers).
        min_cosine: fail when the mean cosine similarity is lower (embeddings, regressors).
        threads: ONNX Runtime threads.
        delete_on_failure: remove the file when it fails, so nothing unverified is kept.

    Returns:
        The :class:`Verification`.

    Raises:
        VerificationError: when a threshold is not met (after deleting the file if asked).
    """
    from tightfit.compression.benchmark import ort_session
    from tightfit.step.loss import model_output_tensor

    session = ort_session(path, threads=threads)
    reference = reference.cpu().eval()
    diffs, agreements, cosines, scale = [], [], [], 0.0
    for batch in batches:
        args, kwargs = _inputs_of(batch)
        expected = model_output_tensor(reference(*args, **kwargs)).float()
        produced = torch.from_numpy(session.run(None, onnx_feeds(batch))[0]).float()
        if produced.shape != expected.shape:
            raise VerificationError(
                f"export: {Path(path).name} returns shape {tuple(produced.shape)}, the model {tuple(expected.shape)}"
            )
        diffs.append(float((produced - expected).abs().max()))
        scale = max(scale, float(expected.abs().max()))
        if expected.ndim == 2:
            agreements.append((produced.argmax(1) == expected.argmax(1)).float())
        cosines.append(torch.nn.functional.cosine_similarity(produced.flatten(1), expected.flatten(1), dim=1))
    if not diffs:
        raise VerificationError("export: no batch to verify the exported model with")
    agreement = float(torch.cat(agreements).mean()) if agreements else None
    result = Verification(
        samples=int(sum(len(c) for c in cosines)),
        max_abs_diff=max(diffs),
        top1_agreement=agreement,
        cosine=float(torch.cat(cosines).mean()),
        passed=True,
    )
    problems = []
    if max_abs_diff is not None and result.max_abs_diff > max_abs_diff * max(scale, 1.0):
        problems.append(f"max abs diff {result.max_abs_diff:.3g} > {max_abs_diff:g} x {max(scale, 1.0):.3g}")
    if min_top1_agreement is not None and agreement is not None and agreement < min_top1_agreement:
        problems.append(f"top-1 agreement {agreement:.3f} < {min_top1_agreement}")
    if min_cosine is not None and result.cosine < min_cosine:
        problems.append(f"cosine {result.cosine:.4f} < {min_cosine}")
    if problems:
        result.passed = False
        if delete_on_failure:
            Path(path).unlink(missing_ok=True)
        raise VerificationError(
            f"export: {Path(path).name} disagrees with the PyTorch model ({'; '.join(problems)})"
            + ("; the file was not kept" if delete_on_failure else "")
        )
    return result


def export_program(
    model: nn.Module,
    example_batch: Any,
    path: str | os.PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Save a ``torch.export`` ExportedProgram (``.pt2``) with a dynamic batch axis.

    ``tightfit predict`` loads it with ``torch.export.load`` alone, without the model's code;
    ``metadata`` travels inside the archive as ``tightfit.json``. The archive's SHA-256 goes into
    this machine's trust record (``tightfit.trust``): ``predict`` loads no other ``.pt2`` unless told.

    Raises:
        ConfigError: when ``torch.export`` cannot capture the model.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args, kwargs = _tracing_inputs(example_batch)
    model = copy.deepcopy(model).cpu().eval()  # see export_onnx: capture a copy, not the caller's module
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(model, args, kwargs=kwargs, dynamic_shapes=_dynamic_shapes(args, kwargs))
    except Exception as error:  # torch.export raises many error types on uncapturable code
        raise ConfigError(f"export: torch.export could not capture the model: {str(error).splitlines()[0]}") from None
    torch.export.save(program, str(path), extra_files={PROGRAM_METADATA: json.dumps(dict(metadata or {}))})
    record_program(path)
    return path


def export(
    model: nn.Module,
    example_batch: Any,
    directory: str | os.PathLike,
    *,
    verify_batches: Iterable[Any] | None = None,
    calibration_batches: Iterable[Any] = (),
    int8: Literal["auto", "static", "dynamic", "none"] = "auto",
    program: bool = True,
    metadata: Mapping[str, Any] | None = None,
    min_int8_top1_agreement: float = 0.95,
) -> dict[str, Any]:
    """Export a float model for deployment: ONNX fp32, ONNX Runtime int8 and a ``.pt2`` program.

    Args:
        model: the float PyTorch model.
        example_batch: one batch (its inputs define the ONNX inputs; the batch axis is dynamic).
        directory: where ``model.onnx``, ``model.int8.onnx`` and ``model.pt2`` go.
        verify_batches: real batches to verify against (default: the example batch alone).
        calibration_batches: training batches for static int8 (fed one sample at a time).
        int8: ``auto`` (static for CNNs, dynamic otherwise), ``static``, ``dynamic`` or ``none``.
        program: also save the ``torch.export`` program.
        metadata: stored in the files for ``tightfit predict`` (class names, input shape...).
        min_int8_top1_agreement: the int8 file is deleted below this agreement with PyTorch.

    Returns:
        ``{"onnx", "onnx_verification", "onnx_int8", "onnx_int8_verification", "program"}``
        (paths as strings; int8 entries are ``None`` when not made).

    Raises:
        ConfigError, VerificationError: when exporting fails or the fp32 file disagrees.
    """
    from tightfit.compression.quantize import model_kind

    directory = Path(directory)
    batches = list(verify_batches) if verify_batches is not None else [example_batch]
    result: dict[str, Any] = {"program": None, "onnx_int8": None, "onnx_int8_verification": None}
    if program:
        result["program"] = str(export_program(model, example_batch, directory / "model.pt2", metadata=metadata))
    onnx_path = export_onnx(model, example_batch, directory / "model.onnx", metadata=metadata)
    result["onnx"] = str(onnx_path)
    result["onnx_verification"] = verify_onnx(onnx_path, model, batches).to_dict()
    if int8 == "auto":
        int8 = "static" if model_kind(model) == "conv" else "dynamic"
    if int8 != "none":
        feeds = [onnx_feeds(_sample(batch, index)) for batch in calibration_batches for index in range(_size(batch))]
        int8_path = quantize_onnx(onnx_path, directory / "model.int8.onnx", method=int8, calibration_feeds=feeds)
        check = verify_onnx(int8_path, model, batches, max_abs_diff=None, min_top1_agreement=min_int8_top1_agreement)
        result["onnx_int8"], result["onnx_int8_verification"] = str(int8_path), check.to_dict()
    return result


def _size(batch: Any) -> int:
    args, kwargs = _inputs_of(batch)
    return int((args[0] if args else next(iter(kwargs.values()))).shape[0])


def _sample(batch: Any, index: int) -> Any:
    args, kwargs = _inputs_of(batch)
    if kwargs:
        return {key: value[index : index + 1] for key, value in kwargs.items()}
    return (tuple(value[index : index + 1] for value in args), None)
