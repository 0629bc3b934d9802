"""Quantized frozen bases for QLoRA: NF4 through bitsandbytes on CUDA, int8 through torchao elsewhere.

QLoRA keeps the frozen base weights of a model in 4 bits (NF4, bitsandbytes) and trains small
LoRA adapters in full precision on top. bitsandbytes' 4-bit kernels need a CUDA device, so on
CPU and Apple MPS tightfit says so in one line and uses the next best thing that really trains
there: an int8 weight-only base through torchao (PEFT wraps torchao's int8 layers with
``TorchaoLoraLinear``; the gradients reach the adapters through the int8 matmul). When torchao is
missing too, the base stays in its own dtype (use ``precision: bf16`` for a bf16 base).

The byte counts here are the ones the planner uses for a quantized base on a meta model, where
nothing is really quantized: NF4 packs two weights a byte and keeps one fp32 absmax per block of
64 weights, itself 8-bit quantized in blocks of 256 with one fp32 constant each ("double
quantization", Dettmers et al. 2023, section 3); int8 weight-only keeps one byte a weight plus one
scale per output row in the weight's dtype.
"""

from collections.abc import Callable, Iterable

import torch
from torch import nn

from tightfit._optional import is_available, require
from tightfit.errors import ConfigError
from tightfit.names import QUANTIZE_BASES

QUANTIZE_BASE_CHOICES = (None, *QUANTIZE_BASES)

NF4_BLOCK_SIZE = 64  # weights per absmax constant (bitsandbytes' default for 4-bit)
NF4_DOUBLE_QUANT_BLOCK_SIZE = 256  # absmax constants per fp32 second-level constant


def resolve_quantize_base(requested: str | None, device_type: str) -> tuple[str | None, str]:
    """Choose the base quantization that will really run on ``device_type``, and say why.

    Args:
        requested: ``None``, ``"nf4"`` or ``"int8"`` (``LoRAConfig.quantize_base``).
        device_type: ``"cuda"``, ``"mps"`` or ``"cpu"``.

    Returns:
        ``(quantize_base, reason)``: what tightfit uses and a one-line reason; ``reason`` is empty
        when the request is used as is.

    Raises:
        ConfigError: when ``requested`` is not one of the choices.

    Example:
        >>> resolve_quantize_base("nf4", "cpu")[0]   # without CUDA
        'int8'
    """
    if requested not in QUANTIZE_BASE_CHOICES:
        raise ConfigError(
            f"lora.quantize_base must be one of null, nf4, int8; got {requested!r}"
        )
    if requested is None:
        return None, ""
    torchao_ok = is_available("torchao")
    if requested == "nf4":
        if device_type == "cuda" and is_available("bitsandbytes"):
            return "nf4", ""
        why = (
            "bitsandbytes is not installed"
            if device_type == "cuda"
            else f"bitsandbytes' 4-bit kernels need a CUDA GPU and this run is on {device_type}"
        )
        if torchao_ok:
            return "int8", (
                f"QLoRA nf4 is not available: {why}; using an int8 weight-only base through "
                "torchao instead (about 1 byte per base weight instead of 0.5)"
            )
        return None, (
            f"QLoRA nf4 is not available: {why}, and torchao (int8 fallback) is not installed; "
            'the base keeps its dtype (use precision: bf16 for a bf16 base, or pip install "tightfit[compress]")'
        )
    if torchao_ok:
        return "int8", ""
    return None, (
        'an int8 base needs torchao, which is not installed (pip install "tightfit[compress]"); '
        "the base keeps its dtype"
    )


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
        blocks = -(-numel // NF4_BLOCK_SIZE)
        second_level = -(-blocks // NF4_DOUBLE_QUANT_BLOCK_SIZE)
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
    embedding_weights = {
        id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)
    }
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
    model: nn.Module, quantize_base: str, *, skip: Iterable[str] = (), device: torch.device | None = None
) -> list[str]:
    """Quantize the frozen Linear layers of ``model`` in place, before LoRA wraps them.

    Args:
        model: the base model (real weights; a meta model cannot be quantized, plan it instead).
        quantize_base: ``"nf4"`` (bitsandbytes, CUDA) or ``"int8"`` (torchao weight-only).
        skip: module names left in full precision (trainable heads).
        device: for ``nf4``, the CUDA device the quantized layers live on.

    Returns:
        The names of the quantized layers.

    Raises:
        ConfigError: for a meta model or an unknown method.
    """
    if any(parameter.is_meta for parameter in model.parameters()):
        raise ConfigError(
            "a meta-device model cannot be quantized; the planner counts quantized bytes instead"
        )
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
        _quantize_nf4(model, names, device or torch.device("cuda"))
        return names
    raise ConfigError(f"unknown quantize_base {quantize_base!r} (expected nf4 or int8)")


def _name_filter(selected: set[str], model: nn.Module) -> Callable[[nn.Module, str], bool]:
    # torchao's filter gets (module, fully qualified name); compare by identity as well so a
    # model whose names differ by a prefix (a wrapper) still matches.
    wanted = {id(module) for name, module in model.named_modules() if name in selected}
    return lambda module, name: id(module) in wanted


def _quantize_nf4(model: nn.Module, names: list[str], device: torch.device) -> None:
    bnb = require("bitsandbytes", extra="gpu", purpose="QLoRA with an NF4 base")
    modules = dict(model.named_modules())
    for name in names:
        linear = modules[name]
        compute_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        quantized = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=True,  # double quantization of the absmax constants
            quant_type="nf4",
        )
        quantized.weight = bnb.nn.Params4bit(
            linear.weight.data.to("cpu"), requires_grad=False, compress_statistics=True, quant_type="nf4"
        )
        if linear.bias is not None:
            quantized.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
        quantized.to(device)  # Params4bit quantizes when it moves to CUDA
        parent_name, _, child_name = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child_name, quantized)
