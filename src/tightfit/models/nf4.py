"""The two NF4 backends a QLoRA base can be quantized with, and which one runs where.

* ``bitsandbytes`` (>= 0.50): ``Linear4bit`` with ``quant_type="nf4"`` and
  ``compress_statistics=True`` (double quantization). Its support matrix lists 4-bit on CUDA, on
  the x86-64 CPU (from 0.47) and on Apple MPS (from 0.50).
* ``torchao``: ``to_nf4`` / ``linear_nf4``, a pure-PyTorch tensor subclass (block 64, absmax
  constants quantized in blocks of 256: the same double quantization), so it runs on every
  device PyTorch does; the weight is dequantized for each matmul.

bitsandbytes is imported offline: its CPU backend asks the ``kernels`` package for a hub kernel
(``kernels-community/quantization-bitsandbytes``) when the CPU has AVX512-BF16, and its MPS
backend does the same lazily on macOS 26. tightfit never reaches for the network or runs code
fetched from a hub, so ``tightfit._optional.import_bitsandbytes`` hides ``kernels`` while bitsandbytes imports
(it then uses its own compiled CPU library), silences the warning it logs about it, and marks
the MPS hub kernel as unavailable.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from tightfit._optional import import_bitsandbytes, is_available, require
from tightfit.errors import ConfigError
from tightfit.names import NF4_BACKENDS

# Measured on this CPU (docs/lora.md, benchmarks/nf4_backends.py): the default backend per device.
# CUDA and MPS keep bitsandbytes, whose fused 4-bit kernels are what its support matrix is for.
DEFAULT_NF4_BACKEND = {"cuda": "bitsandbytes", "mps": "bitsandbytes", "cpu": "bitsandbytes"}
BACKEND_DEVICES = {"bitsandbytes": ("cuda", "cpu", "mps"), "torchao": ("cuda", "cpu", "mps")}
BACKEND_EXTRA = {"bitsandbytes": "gpu", "torchao": "compress"}
NF4_BLOCK = 64  # weights per absmax constant (both backends)
DOUBLE_QUANT_BLOCK = 256  # absmax constants per fp32 second-level constant


def resolve_nf4_backend(requested: str, device_type: str, *, check_installed: bool = True) -> tuple[str, str]:
    """The NF4 backend for ``device_type`` and why it was chosen.

    Args:
        requested: ``auto``, ``bitsandbytes`` or ``torchao`` (``lora.quant_backend``).
        device_type: ``cuda``, ``mps`` or ``cpu`` of the *target* device.
        check_installed: also require the package here (training does; a plan for another
            machine does not, since that machine installs its own packages).

    Returns:
        ``(backend, reason)``.

    Raises:
        ConfigError: the backend cannot run on the device or is not installed; the message names
            what would work.
    """
    if requested not in ("auto", *NF4_BACKENDS):
        raise ConfigError(f"lora.quant_backend must be one of auto, {', '.join(NF4_BACKENDS)}; got {requested!r}")
    if requested == "auto":
        backend = DEFAULT_NF4_BACKEND.get(device_type, "torchao")
        reason = f"the default for {device_type}, chosen on the measurements in docs/lora.md"
        if check_installed and not is_available(backend):
            other = next(name for name in NF4_BACKENDS if name != backend)
            if is_available(other):
                return other, f"{backend} is not installed here; {other} runs NF4 on {device_type} too"
    else:
        backend, reason = requested, "lora.quant_backend asks for it"
    if device_type not in BACKEND_DEVICES[backend]:
        works = [name for name in NF4_BACKENDS if device_type in BACKEND_DEVICES[name]]
        raise ConfigError(
            f"lora.quant_backend: {backend} has no NF4 kernels for {device_type}; use quant_backend: "
            f"{' or '.join(works) or 'none'} or quantize_base: int8"
        )
    if check_installed and not is_available(backend):
        others = [name for name in NF4_BACKENDS if name != backend and is_available(name)]
        instead = f"use lora.quant_backend: {others[0]}, or " if others else ""
        raise ConfigError(
            f"lora.quantize_base: nf4 through {backend} needs {backend}, which is not installed; "
            f'{instead}pip install "tightfit[{BACKEND_EXTRA[backend]}]"'
        )
    return backend, reason


def compute_dtype_for(precision: str | None, device_type: str) -> torch.dtype:
    """The dtype the dequantized NF4 weight is multiplied in.

    16-bit precisions use their own dtype. For fp32 runs the matmul stays in fp32 (the adapters'
    gradients see no extra rounding); pass ``bf16`` precision for the faster bf16 matmul.
    """
    del device_type  # the same rule everywhere: the run's precision decides
    if precision in ("bf16", "bf16-pure"):
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    return torch.float32


class TorchaoNF4Linear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight is torchao's ``NF4Tensor`` (``linear_nf4`` in forward).

    It stays an ``nn.Linear`` so PEFT wraps it like any other Linear; only the input gradient
    flows through it (the NF4 weight never trains).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

        output = linear_nf4(input.to(self.compute_dtype), self.weight).to(input.dtype)
        return output + self.bias.to(output.dtype) if self.bias is not None else output


def quantize_nf4(
    model: nn.Module, names: Iterable[str], *, backend: str, device: torch.device, compute_dtype: torch.dtype
) -> None:
    """Replace the Linear layers ``names`` of ``model`` by frozen NF4 layers, in place, on ``device``.

    Each weight is moved to ``device`` and quantized there one layer at a time, so at most one
    layer exists in full precision on the device beside the NF4 ones.
    """
    modules = dict(model.named_modules())
    make = _bitsandbytes_layer if backend == "bitsandbytes" else _torchao_layer
    for name in names:
        linear = modules[name]
        quantized = make(linear, device, compute_dtype)
        parent_name, _, child_name = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child_name, quantized)


def _bitsandbytes_layer(linear: nn.Linear, device: torch.device, compute_dtype: torch.dtype) -> nn.Module:
    bnb = import_bitsandbytes()
    quantized = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=True,  # double quantization of the absmax constants
        quant_type="nf4",
        device="meta",
    )
    # Its CPU inference path repacks the weight in place at the first no-grad eval forward, after
    # which training steps fail (a validation pass between epochs would): keep one layout.
    quantized.support_avx512bf16_for_cpu = False
    quantized.weight = bnb.nn.Params4bit(
        linear.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
    )
    if linear.bias is not None:
        quantized.bias = nn.Parameter(linear.bias.data.to(device, compute_dtype), requires_grad=False)
    quantized.weight = quantized.weight.to(device)  # Params4bit quantizes when it moves to a device
    return quantized


def scaler_block_size(blocks: int) -> int:
    """Absmax constants per second-level constant for torchao: 256 as in bitsandbytes, or the
    largest divisor of ``blocks`` below it (torchao needs whole blocks; a 128x352 Llama MLP
    weight has 704 absmax constants, quantized in blocks of 176)."""
    return next(size for size in range(min(DOUBLE_QUANT_BLOCK, blocks), 0, -1) if blocks % size == 0)


def _torchao_layer(linear: nn.Linear, device: torch.device, compute_dtype: torch.dtype) -> nn.Module:
    nf4tensor = require(
        "torchao.quantization.quantize_.workflows.nf4.nf4_tensor",
        extra="compress",
        purpose="an NF4 base through torchao",
    )
    quantized = TorchaoNF4Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    weight = linear.weight.data.to(device)
    blocks, remainder = divmod(weight.numel(), NF4_BLOCK)
    if remainder:
        raise ConfigError(
            f"lora.quant_backend: torchao's NF4 needs weights in whole blocks of {NF4_BLOCK}; {linear.in_features}x"
            f"{linear.out_features} is not: use quant_backend: bitsandbytes"
        )
    quantized.weight = nn.Parameter(nf4tensor.to_nf4(weight, NF4_BLOCK, scaler_block_size(blocks)), requires_grad=False)
    if linear.bias is not None:
        quantized.bias = nn.Parameter(linear.bias.data.to(device), requires_grad=False)
    quantized.compute_dtype = compute_dtype
    return quantized
