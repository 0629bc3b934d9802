"""Numeric precision: which one to use on a device, and the autocast context for it.

Names: ``fp32``; ``fp16`` (fp16 autocast, a GradScaler on CUDA); ``bf16`` (bf16 autocast, fp32
weights); ``bf16-pure`` (weights, gradients and optimizer state in bf16); ``auto``.
"""

import contextlib

import torch

from tightfit.errors import ConfigError
from tightfit.names import PRECISIONS, canonical_precision


def resolve_precision(requested: str, device_type: str, supports_bf16: bool | None = None) -> tuple[str, str]:
    """Turn ``requested`` (a name from ``PRECISIONS`` or ``auto``) into a precision and a reason.

    ``auto`` picks bf16 where the device runs it natively (CUDA with bf16 support), fp16 on CUDA
    without bf16 and on MPS, and fp32 on CPU, where autocast to bf16 is usually slower than fp32
    without AMX/AVX512-BF16.

    ``supports_bf16``: whether the target CUDA device runs bf16 (a plan passes its device
    profile's answer); None asks the CUDA device of this process (a run on it).

    Raises:
        ConfigError: for an unknown name or a precision the device cannot run.
    """
    requested = canonical_precision(requested)  # Lightning's "bf16-mixed" is bf16
    if requested not in (*PRECISIONS, "auto"):
        raise ConfigError(f"precision: unknown value {requested!r} (choose from auto, {', '.join(PRECISIONS)})")
    if requested == "fp16" and device_type == "cpu":
        raise ConfigError("precision: fp16 autocast is not supported for training on CPU; use bf16 or fp32")
    if requested != "auto":
        return requested, "as configured"
    if device_type == "cuda":
        if torch.cuda.is_bf16_supported() if supports_bf16 is None else supports_bf16:
            return "bf16", "CUDA device supports bf16: same range as fp32, no loss scaling needed"
        return "fp16", "CUDA device without bf16: fp16 autocast with a GradScaler"
    if device_type == "mps":
        return "fp16", "MPS: fp16 autocast halves activation memory on unified memory"
    return "fp32", "CPU: fp32 is the fastest exact choice without bf16 matrix units"


def autocast(precision: str, device_type: str):
    """The autocast context for a precision; a no-op for fp32 and bf16-pure."""
    if precision == "fp16":
        return torch.autocast(device_type=device_type, dtype=torch.float16)
    if precision == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def needs_grad_scaler(precision: str, device_type: str) -> bool:
    """fp16 gradients underflow without loss scaling; torch's GradScaler supports CUDA (and MPS)."""
    return precision == "fp16" and device_type in ("cuda", "mps")


def parameter_dtype(precision: str) -> torch.dtype:
    """The dtype the model's parameters are kept in."""
    return torch.bfloat16 if precision == "bf16-pure" else torch.float32
