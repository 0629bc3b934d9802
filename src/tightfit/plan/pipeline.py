"""Feasibility of a whole pipeline on one device: ``tightfit plan PIPELINE.yaml``.

A pipeline file lists stages (feature extractors, fine-tunes, a classifier on the CPU) and the one
device they must run on; the planner answers for every stage and prints one table, the kind of
document people otherwise write by hand (``reference/seed-002-rtx3050-feasibility.md``).

.. code-block:: yaml

    # tightfit plan examples/pipelines/seed002-rtx3050.yaml
    name: medical imaging feature pipeline
    device: rtx3050-laptop-6gb        # a profile name, or auto / cpu / cuda / mps
    memory: null                      # optional budget, e.g. 5GiB, replacing the usable memory
    margin: 0.1                       # headroom kept free
    stages:
      - name: baseline-cnn
        model: torchvision:resnet50
        input: 3x224x224
        effective_batch_size: 32      # recommend micro-batch/accumulation/precision to reach it
        samples: 20000                # per epoch, for the epoch time
      - name: classifier
        kind: cpu                     # runs on the CPU (scikit-learn); no model spec
        features: 2048
        samples: 20000
        note: SVM on the extracted features

An ``extract`` stage (a frozen backbone computing features) is planned forward-only
(:mod:`tightfit.plan.inference`): no gradients, no optimizer state, activations freed layer by
layer; without ``batch_size`` it gets the largest batch that fits, and ``samples`` gives its time.
A training stage takes ``model``, ``input`` and optionally ``batch_size`` (check exactly that),
``effective_batch_size``, ``precision``, ``optimizer``, ``checkpointing``, ``lora_rank``,
``quantize_base`` (with ``lora_rank``: ``nf4`` or ``int8``), ``samples``, ``model_kwargs`` and
``note``; ``devices: N`` and ``strategy: fsdp | ddp`` plan it per rank on N of the pipeline's
devices (``tightfit.plan.distributed``; ``devices: auto`` finds how many are needed). A ``cpu`` stage is estimated as
its feature matrix in
float64 plus libsvm's kernel cache (scikit-learn's default ``cache_size=200`` MB) against the
host's memory.
"""

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from tightfit.errors import ConfigError, TightfitError
from tightfit.names import INFERENCE_PRECISIONS, OPTIMIZERS, PRECISIONS, QUANTIZE_BASES
from tightfit.settings import describe_validation_error, read_yaml
from tightfit.trust import check_spec_from_file
from tightfit.units import format_bytes

SVM_KERNEL_CACHE_BYTES = 200 * 10**6  # sklearn.svm.SVC(cache_size=200) MB, its default


class StageConfig(BaseModel, extra="forbid", allow_inf_nan=False):
    """One stage of a pipeline file."""

    name: str
    kind: Literal["train", "extract", "cpu"] = "train"
    model: str | None = None
    input: str | None = None
    batch_size: int | None = Field(None, ge=1)
    effective_batch_size: int | None = Field(None, ge=1)
    precision: Literal[PRECISIONS] | None = None
    optimizer: Literal[OPTIMIZERS] | None = None
    checkpointing: bool | None = None
    lora_rank: int | None = Field(None, ge=1)
    quantize_base: Literal[QUANTIZE_BASES] | None = None
    samples: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1, description="train: epochs, for the stage's total time")
    cpu_seconds: float | None = Field(None, ge=0, description="cpu: the caller's estimate of the stage's time")
    cpu_bytes: int | None = Field(None, ge=0, description="cpu: the caller's estimate of the stage's RAM")
    features: int | None = Field(None, ge=1)
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    devices: int | Literal["auto"] | None = Field(None, description="plan per rank on N devices (auto: find N)")
    strategy: Literal["fsdp", "ddp"] = "fsdp"
    note: str = ""


class PipelineConfig(BaseModel, extra="forbid", allow_inf_nan=False):
    """A pipeline file: the device and the stages."""

    name: str = "pipeline"
    device: str | None = None
    memory: str | int | None = None
    margin: float = Field(0.1, ge=0, lt=1)
    stages: list[StageConfig] = Field(min_length=1)


@dataclass
class StageResult:
    """One row of the feasibility table (``plan`` holds the full :class:`PlanResult` dict)."""

    name: str
    kind: str
    model: str | None
    input: str | None
    verdict: str
    fits: bool
    micro_batch_size: int | None
    accumulation_steps: int | None
    precision: str | None
    checkpointing: bool | None
    optimizer: str | None
    peak_bytes: int
    budget_bytes: int
    step_time_s: float | None
    epoch_time_s: float | None
    why: str
    note: str
    plan: dict | None = None
    epochs: int | None = None
    time_s: float | None = None  # the whole stage: epochs x epoch (train), one pass (extract), the estimate (cpu)


@dataclass
class PipelineResult:
    """The feasibility of every stage on one device."""

    name: str
    device: str
    budget_bytes: int
    margin: float
    stages: list[StageResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def fits(self) -> bool:
        return all(stage.fits for stage in self.stages)

    @property
    def total_time_s(self) -> float | None:
        """Every stage's time summed (None when a stage has none)."""
        times = [stage.time_s for stage in self.stages]
        return None if not times or any(time_s is None for time_s in times) else float(sum(times))

    def to_dict(self) -> dict:
        total = self.total_time_s
        return {
            **asdict(self),
            "fits": self.fits,
            "total_time_s": total,
            "total_time_h": round(total / 3600, 2) if total is not None else None,
        }


def load_pipeline(path: str | Path, *, trust_code: bool = False) -> PipelineConfig:
    """Read and validate a pipeline file.

    Args:
        path: the pipeline YAML file.
        trust_code: let a stage's ``model`` be a ``module.path:callable`` spec (``--trust-code``).

    Raises:
        ConfigError: the file is missing or not YAML, or a key is unknown or has a bad value; the
            message names the file, the key (``stages[1].batchsize``) and the closest valid key.
    """
    raw = read_yaml(path, what="pipeline file")
    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{path}: {describe_validation_error(error, PipelineConfig)}") from None
    for index, stage in enumerate(config.stages):
        check_spec_from_file(stage.model, where=f"{path}: stages[{index}].model", trust_code=trust_code)
    return config


def plan_pipeline(
    config: PipelineConfig,
    *,
    device: str | None = None,
    memory: str | int | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> PipelineResult:
    """Plan every stage of a pipeline against one device.

    Args:
        config: from :func:`load_pipeline`.
        device: overrides the file's device.
        memory: overrides the file's memory budget.
        on_stage: called with each stage's name before it is planned (progress display).

    Returns:
        A :class:`PipelineResult`.

    Raises:
        TightfitError: a stage has a bad spec or setting; the message names the stage.
    """
    import time

    from tightfit.hardware.profiles import resolve_target
    from tightfit.plan.planner import plan

    started = time.perf_counter()
    profile = resolve_target(device or config.device, memory if memory is not None else config.memory)
    result = PipelineResult(config.name, profile.name, profile.usable_bytes, config.margin)
    forward_plans: dict = {}
    for stage in config.stages:
        if on_stage is not None:
            on_stage(stage.name)
        if stage.kind == "cpu":
            result.stages.append(_cpu_stage(stage, profile))
            continue
        if not stage.model or not stage.input:
            raise ConfigError(f"stage {stage.name!r}: a {stage.kind} stage needs 'model' and 'input' (or kind: cpu)")
        if stage.kind == "extract":
            result.stages.append(_extract_stage(stage, profile, config.margin, forward_plans))
            continue
        if stage.devices is not None:
            result.stages.append(_distributed_stage(stage, profile, config.margin))
            continue
        try:
            planned = plan(
                stage.model,
                stage.input,
                batch_size=stage.batch_size,
                precision=stage.precision,
                optimizer=stage.optimizer,
                checkpointing=stage.checkpointing,
                lora_rank=stage.lora_rank,
                quantize_base=stage.quantize_base,
                profile=profile,
                effective_batch_size=stage.effective_batch_size,
                margin=config.margin,
                samples=stage.samples,
                model_kwargs=stage.model_kwargs,
            )
        except TightfitError as error:
            raise type(error)(f"stage {stage.name!r}: {error}") from None
        chosen = planned.recommendation or {
            "micro_batch_size": stage.batch_size,
            "accumulation_steps": (
                math.ceil(stage.effective_batch_size / stage.batch_size)
                if stage.batch_size and stage.effective_batch_size
                else 1
            ),
            "precision": stage.precision or "fp32",
            "checkpointing": bool(stage.checkpointing),
            "optimizer": stage.optimizer or "adamw",
        }
        fits = planned.fits
        result.stages.append(
            StageResult(
                name=stage.name,
                kind="train",
                model=stage.model,
                input=stage.input,
                verdict=planned.verdict,
                fits=fits,
                micro_batch_size=chosen["micro_batch_size"] if fits else None,
                accumulation_steps=chosen["accumulation_steps"] if fits else None,
                precision=chosen["precision"] if fits else None,
                checkpointing=chosen["checkpointing"] if fits else None,
                optimizer=chosen["optimizer"] if fits else None,
                peak_bytes=planned.peak_bytes,
                budget_bytes=planned.budget_bytes or 0,
                step_time_s=planned.step_time_s,
                epoch_time_s=planned.epoch_time_s,
                why=planned.why,
                note=stage.note,
                plan=planned.to_dict(),
            )
        )
    for planned_stage, stage in zip(result.stages, config.stages):
        planned_stage.epochs = stage.epochs
        planned_stage.time_s = _stage_time(planned_stage, stage)
    result.seconds = round(time.perf_counter() - started, 2)
    return result


def _stage_time(result: StageResult, stage: StageConfig) -> float | None:
    """The whole stage's time: epochs x epoch (train, one epoch without ``epochs``), a pass (extract), or the
    caller's estimate (cpu)."""
    if result.kind == "cpu":
        return stage.cpu_seconds
    if result.epoch_time_s is None:
        return None
    return result.epoch_time_s * (stage.epochs or 1) if result.kind == "train" else result.epoch_time_s


def _extract_stage(stage: StageConfig, profile, margin: float, planned_before: dict) -> StageResult:
    """A forward-only stage: the peak at its batch size, or the largest batch that fits.

    ``planned_before`` caches the plans of this pipeline: a study's arms often extract with the
    same backbone (pre-trained differently), which plans the same.
    """
    import json

    from tightfit.plan.inference import plan_inference

    precision = stage.precision or "fp32"
    if precision not in INFERENCE_PRECISIONS:
        raise ConfigError(f"stage {stage.name!r}: precision: {precision} is not an inference precision")
    key = json.dumps(
        [stage.model, stage.input, stage.batch_size, precision, stage.samples, stage.model_kwargs],
        sort_keys=True,
        default=str,
    )
    try:
        if key not in planned_before:
            planned_before[key] = plan_inference(
                stage.model,
                stage.input,
                batch_size=stage.batch_size,
                precision=precision,
                profile=profile,
                margin=margin,
                samples=stage.samples,
                model_kwargs=stage.model_kwargs,
            )
    except TightfitError as error:
        raise type(error)(f"stage {stage.name!r}: {error}") from None
    planned = planned_before[key]
    step_time = planned.time_per_sample_s * planned.batch_size if planned.time_per_sample_s else None
    return StageResult(
        name=stage.name,
        kind="extract",
        model=stage.model,
        input=stage.input,
        verdict=planned.verdict,
        fits=planned.fits,
        micro_batch_size=planned.batch_size if planned.fits else None,
        accumulation_steps=1 if planned.fits else None,
        precision=precision,
        checkpointing=None,
        optimizer=None,
        peak_bytes=planned.peak_bytes,
        budget_bytes=planned.budget_bytes,
        step_time_s=step_time,
        epoch_time_s=planned.total_time_s,
        why=planned.why,
        note=stage.note,
        plan=planned.to_dict(),
    )


def _distributed_stage(stage: StageConfig, profile: Any, margin: float) -> StageResult:
    """A stage shared by several devices: each rank's peak (``tightfit.plan.distributed``)."""
    from tightfit.plan.distributed import plan_distributed

    if stage.effective_batch_size or stage.quantize_base:
        raise ConfigError(
            f"stage {stage.name!r}: with devices, give batch_size per rank (no effective_batch_size, no quantize_base)"
        )
    try:
        planned = plan_distributed(
            stage.model,
            stage.input,
            devices=None if stage.devices == "auto" else stage.devices,
            strategy=stage.strategy,
            batch_size=stage.batch_size or 1,
            precision=stage.precision or "bf16-pure",
            optimizer=stage.optimizer or "adamw",
            checkpointing=True if stage.checkpointing is None else stage.checkpointing,
            lora_rank=stage.lora_rank,
            margin=margin,
            model_kwargs=stage.model_kwargs,
            profile=profile,
        )
    except TightfitError as error:
        raise type(error)(f"stage {stage.name!r}: {error}") from None
    row = planned.rows[-1]
    fits = row.fits
    steps = (
        math.ceil(stage.samples / (planned.micro_batch_size * row.devices))
        if stage.samples and row.step_time_s
        else None
    )
    why = (
        f"{row.devices} x {profile.name} with {stage.strategy}: {format_bytes(row.peak_bytes)} per rank of "
        f"{format_bytes(row.usable_bytes)}" + ("" if fits else f"; none up to {row.devices} fits")
    )
    return StageResult(
        name=stage.name,
        kind="train",
        model=stage.model,
        input=stage.input,
        verdict="fits" if fits else "does not fit",
        fits=fits,
        micro_batch_size=planned.micro_batch_size if fits else None,
        accumulation_steps=1 if fits else None,
        precision=planned.precision if fits else None,
        checkpointing=planned.checkpointing if fits else None,
        optimizer=planned.optimizer if fits else None,
        peak_bytes=row.peak_bytes,
        budget_bytes=row.usable_bytes,
        step_time_s=row.step_time_s,
        epoch_time_s=steps * row.step_time_s if steps else None,
        why=why,
        note=stage.note or f"{row.devices} devices, {stage.strategy}",
        plan=planned.to_dict(),
    )


def _cpu_stage(stage: StageConfig, profile: Any) -> StageResult:
    """A CPU stage against the *target's* host RAM (the profile's, else this machine's, said which)."""
    import psutil

    if profile.host_memory_bytes:
        host_bytes, host = profile.host_memory_bytes, f"{profile.name}'s host"
    elif profile.unified_memory and profile.device_type != "cpu":
        host_bytes, host = profile.memory_bytes, f"{profile.name}'s unified"
    else:
        host_bytes, host = psutil.virtual_memory().total, "this machine's"
    if stage.cpu_bytes is not None:
        peak_bytes = stage.cpu_bytes
        why = (
            f"{format_bytes(peak_bytes)} estimated from the samples and feature width, against {host} "
            f"{format_bytes(host_bytes)} RAM"
        )
    elif stage.samples and stage.features:
        matrix_bytes = stage.samples * stage.features * 8  # scikit-learn works in float64
        peak_bytes = matrix_bytes + SVM_KERNEL_CACHE_BYTES
        why = (
            f"feature matrix {stage.samples} x {stage.features} float64 = {format_bytes(matrix_bytes)} "
            f"+ kernel cache {format_bytes(SVM_KERNEL_CACHE_BYTES)}, against {host} {format_bytes(host_bytes)} RAM"
        )
    else:
        peak_bytes = 0
        why = "CPU stage without samples/features: memory not estimated"
    fits = peak_bytes <= host_bytes
    return StageResult(
        name=stage.name,
        kind="cpu",
        model=stage.model,
        input=stage.input,
        verdict=("fits" if peak_bytes < 0.9 * host_bytes else "tight") if fits else "does not fit",
        fits=fits,
        micro_batch_size=None,
        accumulation_steps=None,
        precision=None,
        checkpointing=None,
        optimizer=None,
        peak_bytes=peak_bytes,
        budget_bytes=host_bytes,
        step_time_s=None,
        epoch_time_s=None,
        why=why,
        note=stage.note or "CPU only: no GPU memory needed",
    )
