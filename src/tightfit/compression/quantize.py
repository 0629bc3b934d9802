"""Post-training int8 quantization for CPU inference, chosen by model type and by measured speed.

Three methods, each where it pays:

* ``dynamic``: int8 weights, activations quantized on the fly per batch (``torch.ao``
  ``quantize_dynamic`` on Linear/LSTM/GRU). The right default for Linear- and RNN-heavy models
  (transformer encoders, MLPs): no calibration, ~4x smaller Linear weights.
* ``static``: int8 weights and activations, with activation ranges calibrated on batches drawn from
  the training data (FX graph mode, ``x86``/``qnnpack`` backend: Conv+BN+ReLU are fused and run
  as real int8 kernels). The right choice for CNNs.
* ``weight-only``: int8 weights dequantized on the fly (torchao ``Int8WeightOnlyConfig``): a
  smaller model when int8 arithmetic is not faster.

``auto`` picks the candidates that suit the model type, measures each against the fp32 model with
the same threads (interleaved rounds, so a burst of load from other processes does not decide the
comparison), and keeps the fastest one whose metric stays within tolerance. When nothing is
faster, it keeps the fp32 model and says so: a slower model is never called a win.

Quantized models run on CPU only (MPS has no int8 engine, pytorch #123507). ``torch.ao``
quantization is deprecated in favour of torchao but is still the path with eager int8 CPU kernels
(torchao's int8 dynamic config is slower than fp32 eagerly on x86, pytorch/ao #4365); the
benchmark compares both, and ONNX Runtime, side by side.
"""

from __future__ import annotations

import copy
import platform
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from tightfit._optional import require
from tightfit.errors import ConfigError
from tightfit.names import QUANTIZE_METHODS

QuantizeMethod = Literal[QUANTIZE_METHODS]


@dataclass
class QuantizeResult:
    """The outcome of :func:`quantize`.

    Attributes:
        model: the quantized model (or the unchanged fp32 model when ``method == "none"``).
        method: the method applied: ``dynamic``, ``static``, ``weight-only`` or ``none``.
        reason: why this method was chosen, in one sentence.
        candidates: for ``auto``, each method tried: ``{method, median_ms, metric, error}``.
        warnings: e.g. the CPU lacks VNNI.
    """

    model: nn.Module
    method: str
    reason: str
    candidates: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def model_kind(model: nn.Module) -> str:
    """``"conv"``, ``"recurrent"`` or ``"linear"``: what dominates the model's compute.

    Any convolution makes it a CNN (convolutions dominate FLOPs even when a Linear head holds more
    parameters); then recurrent layers; otherwise Linear layers (MLPs, transformers).
    """
    if _has(model, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if _has(model, (nn.LSTM, nn.GRU, nn.RNN)):
        return "recurrent"
    return "linear"


def candidate_methods(model: nn.Module) -> list[str]:
    """The methods worth trying for this model type, best bet first."""
    kind = model_kind(model)
    if kind == "conv":
        return ["static", "dynamic"] if _has(model, nn.Linear) else ["static"]
    return ["dynamic", "weight-only"]


def _has(model: nn.Module, layer_type: type | tuple[type, ...]) -> bool:
    return any(isinstance(module, layer_type) for module in model.modules())


def quantized_engine() -> str:
    """The int8 CPU engine for this machine: ``x86`` (fbgemm + oneDNN) or ``qnnpack`` on ARM."""
    engines = torch.backends.quantized.supported_engines
    arm = platform.machine().lower() in ("arm64", "aarch64")
    for engine in (("qnnpack",) if arm else ("x86", "fbgemm")) + ("qnnpack", "fbgemm", "x86"):
        if engine in engines:
            return engine
    raise ConfigError(f"quantize: this torch build has no int8 CPU engine (engines: {engines})")


def quantize_dynamic(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantization of Linear (per-channel), LSTM and GRU layers (a copy on CPU; eval mode).

    Embeddings stay fp32, so models whose size is mostly a vocabulary (BERT-style encoders) shrink
    far less than 4x; ONNX Runtime's dynamic int8 (the ``export`` step) quantizes those too.
    """
    torch.backends.quantized.engine = quantized_engine()
    model = copy.deepcopy(model).cpu().eval()
    if not any(_has(model, t) for t in (nn.Linear, nn.LSTM, nn.GRU)):
        raise ConfigError("quantize: dynamic int8 needs Linear, LSTM or GRU layers; the model has none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        # Per-channel weight scales for Linear: on MiniLM, per-tensor scales gave an embedding
        # cosine of 0.946 against fp32, per-channel 0.976 (benchmarks/compression.py).
        qconfig = torch.ao.quantization.default_dynamic_qconfig
        spec = {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig, nn.LSTM: qconfig, nn.GRU: qconfig}
        return torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8)


def quantize_static(
    model: nn.Module,
    example_inputs: tuple,
    calibration_batches: Iterable[Any],
    *,
    max_batches: int = 32,
) -> nn.Module:
    """Static int8 quantization with activation ranges calibrated on real batches.

    Args:
        model: the fp32 model (copied; the original is untouched).
        example_inputs: positional inputs of one forward call, for FX tracing.
        calibration_batches: batches drawn from the training data (any form
            :func:`tightfit.step.loss.split_batch` accepts); ranges come from these, so they
            should look like what the model will see.
        max_batches: calibration batches used at most.

    Returns:
        The quantized model (CPU, eval mode).

    Raises:
        ConfigError: when the model cannot be traced by FX, or no calibration batch is given.
    """
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from tightfit.step.loss import split_batch

    engine = quantized_engine()
    torch.backends.quantized.engine = engine
    model = copy.deepcopy(model).cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        try:
            prepared = prepare_fx(model, get_default_qconfig_mapping(engine), example_inputs)
        except Exception as error:  # FX raises many error types on untraceable code
            raise ConfigError(
                f"quantize: static int8 could not trace the model with torch.fx "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                "use method: dynamic or export + ONNX Runtime int8"
            ) from None
        used = 0
        with torch.inference_mode():
            for batch in calibration_batches:
                if used >= max_batches:
                    break
                args, kwargs, _ = split_batch(batch)
                prepared(*[a.cpu() for a in args], **{k: v.cpu() for k, v in kwargs.items()})
                used += 1
        if used == 0:
            raise ConfigError("quantize: static int8 needs calibration batches; none were given")
        return convert_fx(prepared)


def quantize_weight_only(model: nn.Module) -> nn.Module:
    """Int8 weight-only quantization of Linear layers with torchao (a copy on CPU)."""
    torchao_quantization = require("torchao.quantization", extra="compress", purpose="weight-only int8")
    model = copy.deepcopy(model).cpu().eval()
    if not _has(model, nn.Linear):
        raise ConfigError("quantize: weight-only int8 needs Linear layers; the model has none")
    torchao_quantization.quantize_(model, torchao_quantization.Int8WeightOnlyConfig())
    return model


def quantize(
    model: nn.Module,
    method: QuantizeMethod = "auto",
    *,
    example_batch: Any = None,
    calibration_batches: Iterable[Any] | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    higher_is_better: bool = True,
    tolerance: float = 1.0,
    threads: int | None = None,
) -> QuantizeResult:
    """Quantize a model to int8 for CPU inference.

    Args:
        model: the fp32 model (left untouched; the result is a copy).
        method: ``auto``, ``dynamic``, ``static`` or ``weight-only`` (see the module doc).
        example_batch: one batch (any form the loss rule accepts) for tracing and for timing; its
            size is the batch size ``auto`` times at. Needed for ``static`` and ``auto``.
        calibration_batches: batches from the training data, for ``static``.
        evaluate: ``model -> metric`` on held-out data; ``auto`` rejects a candidate whose metric
            falls more than ``tolerance`` below the fp32 model's.
        higher_is_better: the metric's direction.
        tolerance: allowed metric loss (in the metric's units; accuracy in points).
        threads: threads for timing (default: torch's).

    Returns:
        A :class:`QuantizeResult`.

    Raises:
        ConfigError: on an unknown method, or a method that cannot apply to this model.

    Example:
        >>> result = quantize(model, "auto", example_batch=(x[:1], None), calibration_batches=loader)
        >>> result.method, result.reason
    """
    from tightfit.compression.benchmark import cpu_int8_support
    from tightfit.step.loss import split_batch

    if method not in QUANTIZE_METHODS:
        raise ConfigError(f"quantize: method must be one of {list(QUANTIZE_METHODS)}; got {method!r}")
    notes = [w for w in [cpu_int8_support()["warning"]] if w]
    example_inputs = None
    if example_batch is not None:
        args, _, _ = split_batch(example_batch)
        example_inputs = tuple(a.cpu() for a in args)

    def build(name: str) -> nn.Module:
        if name == "dynamic":
            return quantize_dynamic(model)
        if name == "weight-only":
            return quantize_weight_only(model)
        if example_inputs is None or calibration_batches is None:
            raise ConfigError("quantize: static int8 needs an example batch and calibration batches")
        return quantize_static(model, example_inputs, calibration_batches)

    if method != "auto":
        return QuantizeResult(build(method), method, f"{method} int8 as requested", warnings=notes)
    if example_batch is None:
        raise ConfigError("quantize: method auto needs an example batch to time the candidates")

    cpu_model = copy.deepcopy(model).cpu().eval()
    baseline: dict[str, Any] = {"method": "fp32"}
    candidates = [baseline]
    contenders = {"fp32": cpu_model}
    for name in candidate_methods(model):
        row: dict[str, Any] = {"method": name}
        candidates.append(row)
        try:
            contenders[name] = build(name)
        except ConfigError as error:
            row["error"] = str(error)
    # Time before evaluating: an x86 int8 model whose first call was a large evaluation batch ran
    # batch 1 about 1.7x slower afterwards (its kernels keep the first shape's setup).
    timings = _interleaved_medians(contenders, example_batch, threads=threads)
    for row in candidates:
        if row["method"] in timings:
            row["median_ms"] = timings[row["method"]]
    if evaluate is not None:
        baseline["metric"] = evaluate(cpu_model)
        for row in candidates[1:]:
            if row["method"] not in contenders:
                continue
            row["metric"] = evaluate(contenders[row["method"]])
            change = row["metric"] - baseline["metric"]
            if (change if higher_is_better else -change) < -tolerance:
                row["rejected"] = f"metric {row['metric']:.4g} vs {baseline['metric']:.4g} (tolerance {tolerance})"
    best = min(
        (row for row in candidates if "median_ms" in row and "rejected" not in row),
        key=lambda row: row["median_ms"],
    )
    best_model = contenders[best["method"]]
    kind = model_kind(model)
    if best is baseline:
        reason = (
            f"no int8 method was faster than fp32 within the metric tolerance for this {kind} model on this CPU "
            f"({', '.join(_describe(r) for r in candidates)}); kept fp32"
        )
        return QuantizeResult(best_model, "none", reason, candidates, notes)
    reason = f"{best['method']} int8 was the fastest for this {kind} model: " + ", ".join(
        _describe(r) for r in candidates
    )
    return QuantizeResult(best_model, best["method"], reason, candidates, notes)


def _interleaved_medians(
    models: dict[str, nn.Module], example_batch: Any, *, threads: int | None, rounds: int = 5
) -> dict[str, float]:
    """Median latency per model, taken as the best of ``rounds`` interleaved rounds.

    The models are timed in turn, round after round, so a burst of load from other processes
    hits all of them alike instead of deciding the comparison; each keeps its fastest round's
    median.
    """
    from tightfit.compression.benchmark import measure_torch_latency

    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, candidate in models.items():
            median = measure_torch_latency(
                candidate, example_batch, threads=threads, repeats=50, min_seconds=0.05
            ).median_ms
            best[name] = min(median, best.get(name, float("inf")))
    return best


def _describe(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['method']} not applicable"
    text = f"{row['method']} {row['median_ms']:.3f} ms"
    return text + (" (rejected: metric)" if "rejected" in row else "")


def is_quantized(model: nn.Module) -> bool:
    """Whether any weight of the model is stored in int8 (torch.ao or torchao)."""
    for value in model.state_dict().values():
        tensors = value if isinstance(value, tuple) else (value,)
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor) and (
                tensor.is_quantized or tensor.dtype in (torch.int8, torch.uint8, torch.qint8)
            ):
                return True
    for parameter in model.parameters():
        if "int8" in type(parameter.data).__name__.lower() or "Affine" in type(parameter.data).__name__:
            return True
    return False
