"""Plan the run a training config describes: ``tightfit plan CONFIG.yaml`` plans exactly what
``tightfit train CONFIG.yaml`` would do.

The config's settings become the planner's: the model spec and ``model_options``; the input each
sample has (``tokens:max_length`` for a text corpus, whose packed rows are that long; the image or
feature shape of the data otherwise); ``batch.micro_batch_size`` (checked as is; ``auto`` asks for
a recommendation), the effective batch, the optimizer, the precision (``auto`` resolved for the
target device as the trainer resolves it), activation checkpointing, and the whole ``lora:``
section (targets, heads, and a quantized base with its backend resolved for the target device,
never for the machine that plans).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tightfit.errors import ConfigError

DIGITS_INPUT = "1x8x8"
CLIP_CONTEXT = 77
VAE_DOWNSAMPLING = 8  # SD's VAE: 512 px images -> 64 x 64 latents
DEFAULT_TEXT_LENGTHS = {"text-corpus": 256, "text-csv": 128}


def input_spec_for(config) -> tuple[str, int | None]:
    """``(input spec, num_classes)`` of one sample of the run's data.

    Text corpora, digits and captioned images are known from the config alone; other sources
    are built (as ``train`` builds them) to read their sample shape and class count.
    """
    data = config.data
    if data.source == "text-corpus":
        return f"tokens:{data.max_length or DEFAULT_TEXT_LENGTHS['text-corpus']}", None
    if data.source == "digits":
        return DIGITS_INPUT, 10
    if data.source == "captioned-images":
        resolution = config.model_options.get("resolution") or data.image_size or 512
        side = resolution if isinstance(resolution, int) else resolution[0]
        folder = Path(config.model.partition(":")[2]).expanduser()
        if (
            config.model.startswith("diffusion:")
            and not (folder / "unet").is_dir()
            and (folder / "config.json").is_file()
        ):
            # a UNet-only config (src/tightfit/configs/sd15-unet): what its VAE and text encoder would hand it
            unet = json.loads((folder / "config.json").read_text())
            latent = side // VAE_DOWNSAMPLING
            return (
                f"latents={unet.get('in_channels', 4)}x{latent}x{latent},"
                f"encoder_hidden_states={CLIP_CONTEXT}x{unet['cross_attention_dim']}",
                None,
            )
        return f"pixel_values=3x{side}x{side},input_ids=tokens:{data.max_length or CLIP_CONTEXT}", None
    from tightfit.data.build import build_datasets

    bundle = build_datasets(data, seed=config.seed)
    if data.source == "text-csv":
        return f"tokens:{data.max_length or DEFAULT_TEXT_LENGTHS['text-csv']}", bundle.num_classes
    if bundle.input_shape is None:
        raise ConfigError(f"plan: cannot tell the input shape of the {data.source} data")
    return "x".join(str(side) for side in bundle.input_shape), bundle.num_classes


def plan_run(
    config, *, device: str | None = None, memory: str | int | None = None, margin: float = 0.1, measure: bool = False
):
    """Plan the training run ``config`` describes on ``device`` (default: the config's device).

    Args:
        config: a ``TrainConfig``.
        device: a profile name or ``auto``/``cpu``/``cuda``/``mps``; default ``config.device``.
        memory: a budget replacing the device's usable memory; default ``config.budget``.
        margin: headroom kept free.
        measure: also run real steps here (``PlanResult.measured``).

    Returns:
        The planner's ``PlanResult``; its ``notes`` say how the config was read.
    """
    from tightfit.hardware.profiles import resolve_target
    from tightfit.plan.planner import plan
    from tightfit.step.precision import resolve_precision

    profile = resolve_target(device or config.device, memory if memory is not None else config.budget)
    input_spec, num_classes = input_spec_for(config)
    # auto settings resolve for the target profile (its bf16 support), not for this machine
    precision, precision_reason = resolve_precision(
        config.precision, profile.device_type, supports_bf16=profile.supports_bf16
    )
    if config.precision != "auto":
        precision_reason = "as configured"
    # checkpointing: auto means the model's repeated blocks, on (as train applies it); a list
    # of module names is on too
    activation = config.checkpointing.activation
    checkpointing = activation is not False
    checkpointing_reason = {
        True: "as configured",
        False: "as configured",
        "auto": "auto: the model's repeated blocks",
    }.get(activation if not isinstance(activation, list) else True, "as configured")
    micro = config.batch.micro_batch_size
    batch_size = None if micro == "auto" else micro
    effective = config.batch.effective_batch_size or (
        batch_size * config.batch.accumulation_steps if batch_size else None
    )
    quantize_base = config.lora.quantize_base if config.lora is not None else None
    model_kwargs: dict[str, Any] = dict(config.model_options)
    if num_classes is not None:
        model_kwargs["num_classes"] = num_classes
    result = plan(
        config.model,
        input_spec,
        batch_size=batch_size,
        precision=precision,
        optimizer=config.optimizer.name,
        checkpointing=checkpointing,
        lora=config.lora,
        quantize_base=quantize_base,
        profile=profile,
        effective_batch_size=effective,
        margin=margin,
        measure=measure,
        model_kwargs=model_kwargs,
    )
    result.resolved = {
        "precision": {"value": precision, "reason": precision_reason},
        "checkpointing": {"value": checkpointing, "reason": checkpointing_reason},
        "optimizer": {"value": config.optimizer.name, "reason": f"as configured; runs on {profile.device_type}"},
    } | result.resolved
    result.notes.insert(
        0, f"planned from the run config: input {input_spec}, precision {precision}, optimizer {config.optimizer.name}"
    )
    return result
