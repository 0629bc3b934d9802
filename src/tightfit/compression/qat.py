"""Quantization-aware training: fine-tune with simulated int8, then convert to real int8.

Fake-quantize modules round weights and activations to int8 levels in the forward pass (with a
straight-through gradient), so fine-tuning learns weights that survive quantization; BatchNorm is
folded into the convolutions first, as in the converted model. Better accuracy than post-training
static quantization when that loses too much, at the price of a fine-tune. FX graph mode
(``torch.ao``), the same backend as :func:`tightfit.compression.quantize.quantize_static`.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tightfit.compression.quantize import quantized_engine
from tightfit.compression.training import FinetuneSettings, finetune
from tightfit.errors import ConfigError


def prepare_qat(model: nn.Module, example_inputs: tuple) -> nn.Module:
    """A copy of ``model`` with fake-quantize observers inserted, ready to fine-tune."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    engine = quantized_engine()
    torch.backends.quantized.engine = engine
    model = copy.deepcopy(model).cpu().train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return prepare_qat_fx(model, get_default_qat_qconfig_mapping(engine), example_inputs)
        except Exception as error:  # FX raises many error types on untraceable code
            raise ConfigError(
                f"qat: the model could not be traced with torch.fx ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''})"
            ) from None


def convert_qat(prepared: nn.Module) -> nn.Module:
    """The real int8 model from a fine-tuned fake-quantized one (CPU, eval mode)."""
    from torch.ao.quantization.quantize_fx import convert_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_fx(prepared.cpu().eval())


def qat(
    model: nn.Module,
    data: Any,
    example_inputs: tuple,
    *,
    settings: FinetuneSettings | None = None,
    run_dir: str | Path | None = None,
    progress: bool = False,
) -> nn.Module:
    """Quantization-aware fine-tuning through the trainer, then conversion to int8.

    Args:
        model: the trained fp32 model (left untouched).
        data: a ``DataBundle`` or ``(train, val, test)`` tuple.
        example_inputs: positional inputs of one forward call, for FX tracing.
        settings: fine-tuning length and learning rate (keep the rate low: 1e-4 to 1e-3).
        run_dir: the trainer's run directory.
        progress: show the trainer's progress.

    Returns:
        The int8 model.
    """
    prepared = prepare_qat(model, tuple(a.cpu() for a in example_inputs))
    settings = settings or FinetuneSettings(epochs=1, lr=1e-4)
    if settings.device != "cpu":
        settings = FinetuneSettings(**{**settings.__dict__, "device": "cpu"})  # fake-quant runs on CPU here
    finetune(prepared, data, settings, run_dir=run_dir, progress=progress)
    return convert_qat(prepared)
