"""The ``lora:`` section of a training configuration, without torch or PEFT (``tightfit.config``
imports it; ``models/lora.py`` applies it)."""

from typing import Literal

from pydantic import BaseModel, Field, field_validator

from tightfit.names import QUANT_BACKENDS, QUANTIZE_BASES


class LoRAConfig(BaseModel, extra="forbid", allow_inf_nan=False):
    """The ``lora:`` section of a training configuration.

    Attributes:
        rank: rank ``r`` of the update ``B @ A``; 4-16 is typical, 8 for SD 1.5 in seed-003.
        alpha: scale numerator; the update is multiplied by ``alpha / rank``.
        dropout: dropout on the adapter input.
        target_modules: ``"auto"`` (see the module doc) or module names; a name matches a module
            whose qualified name is the name or ends with ``"." + name``.
        bias: which biases train: ``none``, ``all``, or ``lora_only`` (those of adapted layers).
        quantize_base: ``nf4`` (QLoRA: CUDA, MPS and CPU), ``int8`` (torchao weight-only) or
            ``None``. One that cannot run on the device is an error, never swapped for another.
        quant_backend: who quantizes an ``nf4`` base: ``auto`` (the backend measured best on the
            device, docs/lora.md), ``bitsandbytes`` or ``torchao``.
        modules_to_save: ``"auto"`` or module names trained in full next to the adapters.
    """

    rank: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: Literal["auto"] | list[str] = "auto"
    bias: Literal["none", "all", "lora_only"] = "none"
    quantize_base: Literal[QUANTIZE_BASES] | None = None
    quant_backend: Literal[QUANT_BACKENDS] = "auto"
    modules_to_save: Literal["auto"] | list[str] = "auto"

    @field_validator("target_modules")
    @classmethod
    def _targets_not_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("give at least one module name, or 'auto'")
        return value
