"""Prepare a model for a run, or for planning one: the one place that decides the order.

``prepare_model`` takes a model (a built module, or a spec to build) through::

    module -> activation checkpointing -> LoRA adapters (the base quantized inside) -> precision -> device

This is the order the trainer has always used, and the planners now follow it too, so a plan is
made of the module the run trains. Why this order:

- checkpointing first: it swaps the class of each repeated block in place, so it changes no
  parameter name and is found on the plain module (``auto`` sees the blocks before PEFT wraps them);
  adapters added afterwards live inside the checkpointed blocks and are recomputed with them;
- adapters before the precision cast: the quantized base must be built from the full-precision
  weights (``apply_lora`` fingerprints the base first, then quantizes), and the adapters then get
  the run's parameter dtype together with the rest of the model (``bf16-pure``);
- device last: quantizing and wrapping happen on the CPU copy, and one ``.to(device)`` moves
  everything once.

``for_planning=True`` does the same steps on a meta-device module: nothing is allocated and no
base is quantized (a meta tensor has no values). The quantized base is decided by the same
resolution the run uses (:func:`tightfit.models.qlora.resolve_quantize_base` for the target device)
and returned, so the planner counts its bytes (``qlora.with_quantized_base``). The precision cast
is left to the caller when planning (``dtype=None``): the estimator tries several precisions on one
module.

models/ sits below training/, runs/ and memory/: whatever those know (the run's seed, its
``init_weights``, the resolved precision) comes in as arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class PreparedModel:
    """What :func:`prepare_model` made.

    Attributes:
        module: the model to train (PEFT-wrapped with LoRA), or to plan (on meta).
        checkpointed_blocks: names of the blocks whose activations are recomputed.
        quantize_base: the quantized base the run trains on (``nf4``/``int8``), resolved for the
            device; when planning it is counted, not built.
        notes: what was decided on the way (a quantized base changed for the device...).
    """

    module: nn.Module
    checkpointed_blocks: list[str] = field(default_factory=list)
    quantize_base: str | None = None
    notes: list[str] = field(default_factory=list)


def prepare_model(
    model: nn.Module | str,
    *,
    model_kwargs: dict[str, Any] | None = None,
    checkpointing: bool | str | list[str] = False,
    lora: Any = None,
    base_model: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_type: str | None = None,
    precision: str | None = None,
    for_planning: bool = False,
    verbose: bool = False,
) -> PreparedModel:
    """Take ``model`` through checkpointing, adapters, precision and device, in that order.

    Args:
        model: a built module, or a model spec built here (on meta when ``for_planning``).
        model_kwargs: the spec's options, when ``model`` is a spec.
        checkpointing: ``True``/``"auto"`` for the repeated blocks, a list of block names, or off.
        lora: a ``LoRAConfig`` (or its dict): freeze the base and add adapters; its
            ``quantize_base`` quantizes the frozen base (for real modules only).
        base_model: the spec the base was built from, recorded with the adapters.
        dtype: cast every parameter to it after the adapters (``bf16-pure``), or None.
        device: move the model there last (ignored when planning).
        device_type: the run's device type, for resolving the quantized base when planning.
        precision: the run's resolved precision, for the quantized base's compute dtype.
        for_planning: a meta-device module: nothing quantized, nothing moved.
        verbose: print LoRA's one-line summary.

    Returns:
        A :class:`PreparedModel`.

    Raises:
        ConfigError: a checkpointing block or LoRA target the model does not have.
    """
    if isinstance(model, str):
        from tightfit.models.spec import build_model

        model = build_model(model, meta=for_planning, **(model_kwargs or {}))
    prepared = PreparedModel(model)
    if checkpointing:
        from tightfit.models.checkpointing import apply_activation_checkpointing

        targets = "auto" if checkpointing is True else checkpointing
        prepared.checkpointed_blocks = apply_activation_checkpointing(model, targets)
    if lora is not None:
        from tightfit.models.lora import _validated, apply_lora

        lora = _validated(lora)
        if for_planning:
            prepared.quantize_base = _planned_quantize_base(lora, device_type, prepared.notes)
            lora = lora.model_copy(update={"quantize_base": None})  # counted by the planner, not built
        model = apply_lora(
            model,
            lora,
            verbose=verbose,
            base_model=base_model,
            precision=precision,
            device=None if for_planning else device,  # the base is quantized on the run's device
        )
        summary = getattr(model, "lora_summary", None)
        if not for_planning:
            prepared.quantize_base = getattr(summary, "quantize_base", lora.quantize_base)
        prepared.module = model
    if dtype is not None:
        model.to(dtype=dtype)
    if device is not None and not for_planning:
        model.to(device)
    return prepared


def _planned_quantize_base(lora: Any, device_type: str | None, notes: list[str]) -> str | None:
    """The quantized base the run would build on ``device_type``, by the run's own resolution."""
    if lora.quantize_base is None:
        return None
    from tightfit.models.qlora import resolve_quantize_base

    # a plan may be for another machine: the target's backend need not be installed here
    base = resolve_quantize_base(
        lora.quantize_base, device_type or "cpu", getattr(lora, "quant_backend", "auto"), check_installed=False
    )
    if base.reason:
        notes.append(base.reason)
    return base.method
