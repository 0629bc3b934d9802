"""Quantized frozen bases for QLoRA: NF4 (bitsandbytes or torchao) on CUDA, MPS and CPU, or int8.

QLoRA keeps the frozen base weights of a model in 4 bits (NF4) and trains small LoRA adapters in
full precision on top. NF4 has two backends (``models/nf4.py``), both running on every device
tightfit targets; the default per device is the one measured faster there (docs/lora.md), the
other selectable with ``lora.quant_backend``. ``int8`` is a weight-only base through torchao (PEFT
wraps torchao's int8 layers with ``TorchaoLoraLinear``). A quantization that cannot run is an
error naming what would; tightfit never swaps one for another.

The byte counts here are the ones the planner uses for a quantized base on a meta model, where
nothing is really quantized: NF4 packs two weights a byte and keeps one fp32 absmax per block of
64 weights, itself 8-bit quantized in blocks of 256 with one fp32 constant each ("double
quantization", Dettmers et al. 2023, section 3); int8 weight-only keeps one byte a weight plus one
scale per output row in the weight's dtype.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from tightfit._optional import is_available, require
from tightfit.errors import ConfigError
from tightfit.models.nf4 import DOUBLE_QUANT_BLOCK, NF4_BLOCK, compute_dtype_for, quantize_nf4, resolve_nf4_backend
from tightfit.names import QUANTIZE_BASES

QUANTIZE_BASE_CHOICES = (None, *QUANTIZE_BASES)


@dataclass(frozen=True)
class BaseQuantization:
    """How a LoRA run's frozen base is quantized: ``method`` (``nf4``/``int8``/None), the
    ``backend`` that does it (``bitsandbytes``/``torchao``) and ``reason``, one line for people."""

    method: str | None
    backend: str | None = None
    reason: str = ""

    def line(self) -> str:
        if self.method is None:
            return "base: not quantized"
        return f"base: {self.method} through {self.backend} ({self.reason})"


def resolve_quantize_base(
    requested: str | None, device_type: str, backend: str = "auto", *, check_installed: bool = True
) -> BaseQuantization:
    """The base quantization that runs on ``device_type``, its backend and why; never a swap.

    Args:
        requested: ``None``, ``"nf4"`` or ``"int8"`` (``LoRAConfig.quantize_base``).
        device_type: ``"cuda"``, ``"mps"`` or ``"cpu"`` of the target device.
        backend: ``lora.quant_backend`` for ``nf4``: ``auto``, ``bitsandbytes`` or ``torchao``.
        check_installed: require the backend's package on this machine (a run does; a plan for
            another device does not).

    Returns:
        A :class:`BaseQuantization`.

    Raises:
        ConfigError: an unknown choice, or a quantization that cannot run there; the message
            names what would.

    Example:
        >>> resolve_quantize_base("nf4", "cpu").method   # NF4 on the CPU, not int8 instead
        'nf4'
    """
    if requested not in QUANTIZE_BASE_CHOICES:
        raise ConfigError(f"lora.quantize_base must be one of null, nf4, int8; got {requested!r}")
    if requested is None:
        return BaseQuantization(None)
    if requested == "nf4":
        chosen, reason = resolve_nf4_backend(backend, device_type, check_installed=check_installed)
        return BaseQuantization("nf4", chosen, reason)
    if backend not in ("auto", "torchao"):
        raise ConfigError(
            f"lora.quant_backend: int8 bases are quantized by torchao, not {backend}; use auto or torchao"
        )
    if check_installed and not is_available("torchao"):
        raise ConfigError(
            'lora.quantize_base: int8 needs torchao, which is not installed (pip install "tightfit[compress]"); '
            "or use quantize_base: nf4 with bitsandbytes"
        )
    return BaseQuantization("int8", "torchao", "int8 weight-only (torchao)")


def quantized_weight_bytes(numel: int, out_features: int, quantize_base: str, dtype_bytes: int = 2) -> int:
    """Bytes a frozen Linear weight of ``numel`` elements takes once quantized.

    Args:
        numel: number of weights (``in_features * out_features``).
        out_features: rows of the weight (int8 keeps one scale per row).
        quantize_base: ``"nf4"`` or ``"int8"``.
        dtype_bytes: bytes of the compute dtype the int8 scales are kept in.

    Returns:
        The bytes of the quantized weight and its quantization constants.
    """
    if quantize_base == "nf4":
        blocks = -(-numel // NF4_BLOCK)
        second_level = -(-blocks // DOUBLE_QUANT_BLOCK)
        return -(-numel // 2) + blocks + 4 * second_level
    if quantize_base == "int8":
        return numel + out_features * dtype_bytes
    raise ConfigError(f"unknown quantize_base {quantize_base!r} (expected nf4 or int8)")


def quantizable_linears(model: nn.Module, skip: Iterable[str] = ()) -> list[str]:
    """Names of the ``nn.Linear`` layers a quantized base quantizes.

    Everything Linear except the modules in ``skip`` (trainable heads), a language model's
    output layer (kept in 16 bits, as transformers' bitsandbytes integration does, because its
    errors land directly on the logits), layers whose weight is tied to an embedding, and LoRA's
    own adapter layers.
    """
    skip = tuple(skip)
    embedding_weights = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or id(module.weight) in embedding_weights or module is output_layer:
            continue
        if any(part.startswith("lora_") or part == "modules_to_save" for part in name.split(".")):
            continue
        if any(name == prefix or name.startswith(prefix + ".") for prefix in skip):
            continue
        names.append(name)
    return names


def quantized_base_bytes(model: nn.Module, quantize_base: str, skip: Iterable[str] = ()) -> tuple[int, int]:
    """Bytes of the quantizable Linear weights before and after quantization (works on meta).

    Returns:
        ``(original_bytes, quantized_bytes)`` summed over :func:`quantizable_linears`.
    """
    modules = dict(model.named_modules())
    original = quantized = 0
    for name in quantizable_linears(model, skip):
        weight = modules[name].weight
        original += weight.numel() * weight.element_size()
        dtype_bytes = weight.element_size() if weight.element_size() < 4 else 2
        quantized += quantized_weight_bytes(weight.numel(), weight.shape[0], quantize_base, dtype_bytes)
    return original, quantized


def with_quantized_base(
    breakdown: dict[str, int],
    model: nn.Module,
    quantize_base: str,
    *,
    overhead: Callable[[int], int] | None = None,
    skip: Iterable[str] = (),
    base_weight_bytes: int = 2,
) -> tuple[dict[str, int], list[str]]:
    """Turn the memory breakdown of a LoRA step on a 16-bit base into the same step on a quantized base.

    The planner estimates LoRA on a bf16 base with fake tensors (nothing can be quantized on the
    meta device); this swaps the base Linear weights' bytes for their quantized size
    (:func:`quantized_weight_bytes`), adds the 16-bit copy of the largest weight that
    bitsandbytes dequantizes on the fly during forward and backward, and recomputes the device
    overhead for the new tensor peak.

    Args:
        breakdown: ``parameters, gradients, optimizer, activations, overhead`` in bytes.
        model: the model the breakdown was estimated for (meta is fine).
        quantize_base: ``"nf4"`` or ``"int8"``.
        overhead: the device overhead in bytes for a tensor peak (the planner passes its target's
            ``memory.overhead.device_overhead``), recomputed for the new peak; None: no overhead.
        skip: modules kept in 16 bits (trainable heads).
        base_weight_bytes: bytes per base weight in the estimate (2 for a bf16 base).

    Returns:
        ``(breakdown, notes)``: the new breakdown (same keys) and what was changed, in words.
    """
    from tightfit.units import format_bytes

    modules = dict(model.named_modules())
    names = quantizable_linears(model, skip)
    sixteen_bit = quantized = largest = 0
    for name in names:
        weight = modules[name].weight
        sixteen_bit += weight.numel() * base_weight_bytes
        quantized += quantized_weight_bytes(weight.numel(), weight.shape[0], quantize_base, base_weight_bytes)
        largest = max(largest, weight.numel() * base_weight_bytes)
    adjusted = dict(breakdown)
    adjusted["parameters"] = breakdown["parameters"] - sixteen_bit + quantized
    adjusted["activations"] = breakdown["activations"] + largest
    tensor_peak = sum(value for key, value in adjusted.items() if key != "overhead")
    adjusted["overhead"] = overhead(tensor_peak) if overhead is not None else 0
    notes = [
        f"{quantize_base} base: {len(names)} Linear weights {format_bytes(sixteen_bit)} -> "
        f"{format_bytes(quantized)} (constants included); +{format_bytes(largest)} for the largest "
        "weight dequantized on the fly"
    ]
    return adjusted, notes


def quantize_base_model(
    model: nn.Module,
    quantize_base: str,
    *,
    skip: Iterable[str] = (),
    device: torch.device | str = "cpu",
    backend: str = "bitsandbytes",
    precision: str | None = None,
) -> list[str]:
    """Quantize the frozen Linear layers of ``model`` in place, before LoRA wraps them.

    Args:
        model: the base model (real weights; a meta model cannot be quantized, plan it instead).
        quantize_base: ``"nf4"`` or ``"int8"`` (torchao weight-only).
        skip: module names left in full precision (trainable heads).
        device: where the run trains; NF4 layers are quantized there, one layer at a time.
        backend: for ``nf4``, ``bitsandbytes`` or ``torchao`` (:func:`resolve_quantize_base`).
        precision: the run's precision; it sets the dtype of the NF4 matmul.

    Returns:
        The names of the quantized layers.

    Raises:
        ConfigError: for a meta model or an unknown method.
    """
    if any(parameter.is_meta for parameter in model.parameters()):
        raise ConfigError("a meta-device model cannot be quantized; the planner counts quantized bytes instead")
    names = quantizable_linears(model, skip)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if quantize_base == "int8":
        quantization = require("torchao.quantization", extra="compress", purpose="an int8 LoRA base")
        selected = set(names)
        quantization.quantize_(
            model,
            quantization.Int8WeightOnlyConfig(),
            filter_fn=_name_filter(selected, model),
        )
        return names
    if quantize_base == "nf4":
        device = torch.device(device)
        quantize_nf4(
            model, names, backend=backend, device=device, compute_dtype=compute_dtype_for(precision, device.type)
        )
        return names
    raise ConfigError(f"unknown quantize_base {quantize_base!r} (expected nf4 or int8)")


def _name_filter(selected: set[str], model: nn.Module) -> Callable[[nn.Module, str], bool]:
    # torchao's filter gets (module, fully qualified name); compare by identity as well so a
    # model whose names differ by a prefix (a wrapper) still matches.
    wanted = {id(module) for name, module in model.named_modules() if name in selected}
    return lambda module, name: id(module) in wanted
