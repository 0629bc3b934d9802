"""The planner: will this model train on that device, and with which settings?

Two questions, one engine (:func:`tightfit.memory.estimator.estimate_step`, fake tensors):

* **check** (a batch size is given): the peak and its breakdown for exactly the settings asked
  for, and a verdict against the device's usable memory: ``fits`` (at least ``margin`` headroom),
  ``tight`` (fits with less than ``margin`` headroom) or ``does not fit``, with a one-line why.
* **recommend** (no batch size): for each configuration the device supports (precision x
  activation checkpointing x optimizer), the largest micro-batch whose peak stays below
  ``usable x (1 - margin)``, found by bisection (the peak only grows with the batch size), then
  the accumulation steps that reach the effective batch. The recommendation is the fastest
  configuration by the time model below; the others are the alternatives, with what they cost.

The recipe, top to bottom (:func:`plan`)::

    model  = build_model(spec, meta=True) [+ LoRA adapters]     # no weights allocated
    batch  = make_batch_factory(inputs, model)                   # random batches + targets
    device = resolve_target(...)                                 # budget = usable bytes
    for each configuration: largest fitting micro-batch (estimates cached per setting)
    pick the fastest; time it; (--measure) run real steps on this machine

**Time model** (labelled as estimates everywhere): one micro-step takes the longer of its compute
time, ``flops / (peak FLOP/s of the compute dtype x UTILISATION[device type])``, and the time to
stream the weights three times (forward, backward for activations, backward for weights) at the
profile's memory bandwidth; the optimizer step streams parameters, gradients and optimizer state
in and out once per effective batch. ``flops`` is counted by ``torch.utils.flop_counter`` during
the estimate, so checkpointing's recomputation is included.
"""

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tightfit.errors import ConfigError
from tightfit.memory.bisect import largest_fitting
from tightfit.memory.report import CATEGORIES, StepMemory
from tightfit.step.optim import OPTIMIZERS
from tightfit.step.precision import PRECISIONS
from tightfit.units import format_bytes, plural

# Model FLOPs utilisation of eager PyTorch training: the share of the datasheet peak a training
# step reaches. 35-45 % is typical for mid-size CNNs and transformers on NVIDIA GPUs without
# torch.compile (PaLM paper, appendix B; nanoGPT reports ~40 % MFU for GPT-2 on an A100 eagerly);
# MPS and CPU kernels reach less of their peak.
UTILISATION = {"cuda": 0.40, "mps": 0.30, "cpu": 0.30}
UTILISATION_SOURCE = (
    "assumed model-FLOPs utilisation of eager PyTorch training: 40 % CUDA, 30 % MPS and CPU "
    "(PaLM paper appendix B; nanoGPT's measured ~40 % MFU); the estimate scales with it"
)
# The compute dtype whose peak FLOP/s a precision runs at.
COMPUTE_DTYPE = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "bf16-pure": "bf16"}
# Optimizer state per trainable parameter, in parameter-sized slots (Adam: exp_avg + exp_avg_sq).
OPTIMIZER_SLOTS = {"sgd": 0, "sgd-momentum": 1, "adam": 2, "adamw": 2, "adam8bit": 0.5}
DEFAULT_MAX_BATCH_SIZE = 4096
TIME_TIE = 0.05  # configurations within 5 % of each other's time are ties, broken by safety, then preference
# Ties go to the safer precision: fp32 loses nothing, bf16 autocast keeps fp32 weights and range,
# fp16 autocast can overflow (it needs a gradient scaler), bf16-pure loses small updates.
PRECISION_SAFETY = {"fp32": 0, "bf16": 1, "fp16": 2, "bf16-pure": 3}


@dataclass(frozen=True)
class Settings:
    """One training configuration the planner can estimate."""

    precision: str
    checkpointing: bool
    optimizer: str

    def label(self) -> str:
        return f"{self.precision}{' + ckpt' if self.checkpointing else ''}, {self.optimizer}"


@dataclass
class Option:
    """A configuration and what it gives: its largest fitting micro-batch and the time it takes.

    Attributes:
        settings: precision, checkpointing, optimizer.
        micro_batch_size: the largest micro-batch that fits with the margin (0: none fits).
        accumulation_steps: micro-batches per optimizer step to reach the effective batch.
        effective_batch_size: ``micro_batch_size x accumulation_steps``.
        memory: the estimate at ``micro_batch_size`` (at batch 1 when nothing fits).
        step_time_s: estimated seconds per optimizer step (all its micro-batches).
        epoch_time_s: estimated seconds per epoch, when the number of samples is known.
        capped: the micro-batch stopped at the effective batch or the search limit, not memory.
        note: what this option costs or why it was not evaluated.
        skipped: not estimated because it could not be the answer (``fits`` is then unknown).
    """

    settings: Settings
    micro_batch_size: int
    accumulation_steps: int = 1
    effective_batch_size: int = 0
    memory: StepMemory | None = None
    step_time_s: float | None = None
    epoch_time_s: float | None = None
    capped: bool = False
    note: str = ""
    skipped: bool = False  # not estimated because it could not be the answer (fits is then unknown)

    @property
    def fits(self) -> bool:
        return self.micro_batch_size > 0

    @property
    def seconds_per_sample(self) -> float:
        if not self.fits or not self.step_time_s:
            return math.inf
        return self.step_time_s / self.effective_batch_size

    def to_dict(self) -> dict:
        return {
            "precision": self.settings.precision,
            "checkpointing": self.settings.checkpointing,
            "optimizer": self.settings.optimizer,
            "micro_batch_size": self.micro_batch_size,
            "accumulation_steps": self.accumulation_steps,
            "effective_batch_size": self.effective_batch_size,
            "peak_bytes": self.memory.peak_bytes if self.memory else None,
            "fits": None if self.skipped else self.fits,
            "step_time_s": self.step_time_s,
            "epoch_time_s": self.epoch_time_s,
            "note": self.note,
        }


@dataclass
class PlanResult:
    """The answer of :func:`plan`; ``to_dict()`` is what ``tightfit plan --json`` prints.

    ``peak_bytes``/``breakdown`` describe the checked configuration, or the recommended one (at
    batch 1 of the least memory-hungry configuration when nothing fits).
    """

    model: str
    input: str
    device: str
    budget_bytes: int | None
    margin: float
    batch_size: int | None
    peak_bytes: int
    breakdown: dict[str, int]
    fits: bool
    verdict: str
    why: str
    recommendation: dict | None
    alternatives: list[dict]
    step_time_s: float | None
    epoch_time_s: float | None
    flops_per_step: int | None
    parameters: int
    trainable_parameters: int
    method: str = "estimated"
    notes: list[str] = field(default_factory=list)
    measured: dict | None = None
    seconds: float = 0.0
    # what an auto or device-dependent setting became for the target, and why:
    # {"precision": {"value": "fp16", "reason": "..."}, "base": {"value": "nf4", "backend": ..., "reason": ...}}
    resolved: dict = field(default_factory=dict)
    peak_moment: str | None = None  # forward end, backward or optimizer step (tightfit.memory.tracker.MOMENTS)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------ the recipe


def plan(
    model_spec: str,
    input_spec: str,
    *,
    batch_size: int | None = None,
    precision: str | None = None,
    optimizer: str | None = None,
    checkpointing: bool | None = None,
    lora_rank: int | None = None,
    quantize_base: str | None = None,
    profile: Any = None,
    effective_batch_size: int | None = None,
    margin: float = 0.1,
    samples: int | None = None,
    measure: bool = False,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    model_kwargs: dict | None = None,
    lora: Any = None,
) -> PlanResult:
    """Plan training ``model_spec`` on ``input_spec`` for a device.

    Args:
        model_spec: a model spec (``torchvision:resnet50``, ``hf:DIR``, ...), built on meta.
        input_spec: an input spec (``3x224x224``, ``tokens:512``).
        batch_size: check this micro-batch size; ``None`` recommends one.
        precision: fix the precision; ``None`` lets the planner choose (check mode: fp32).
        optimizer: fix the optimizer; ``None``: AdamW (SGD tried when nothing else fits).
        checkpointing: fix activation checkpointing on or off; ``None`` lets the planner choose
            (check mode: off).
        lora_rank: train LoRA adapters of this rank on a frozen base (``tightfit.models.lora``).
        quantize_base: with ``lora_rank``, count the frozen base Linear weights quantized:
            ``nf4`` (QLoRA) or ``int8`` (``tightfit.models.qlora.with_quantized_base``).
        profile: a ``DeviceProfile``; ``None`` for this machine (``resolve_target()``).
        effective_batch_size: the batch one optimizer step should see, reached by accumulation.
        margin: headroom kept free (0.1 = plan to use at most 90 % of the usable memory).
        samples: samples per epoch, for the epoch time.
        measure: also run real steps on this machine and report measured time and peak.
        max_batch_size: the largest micro-batch the search considers.
        model_kwargs: passed to the model's constructor.
        lora: a whole ``LoRAConfig`` (targets, heads, alpha) instead of ``lora_rank`` alone, as a
            run config's ``lora:`` section gives it (:func:`tightfit.plan.run_plan.plan_run`).

    Returns:
        A :class:`PlanResult`.

    Raises:
        SpecError: bad model or input spec.
        ConfigError: bad settings (unknown precision/optimizer, margin out of range, ...).
    """
    from tightfit.hardware.profiles import resolve_target

    started = time.perf_counter()
    _check_arguments(batch_size, precision, optimizer, effective_batch_size, margin, samples, lora_rank)
    if quantize_base is not None and ((lora_rank is None and lora is None) or quantize_base not in ("nf4", "int8")):
        raise ConfigError(f"quantize base: {quantize_base!r} needs a LoRA rank and one of nf4, int8")
    profile = profile if profile is not None else resolve_target()
    resolved = _resolve_for_target(profile, optimizer, quantize_base, lora)
    planner = _Planner(
        model_spec,
        input_spec,
        profile,
        lora_rank=lora_rank,
        model_kwargs=model_kwargs or {},
        quantize_base=quantize_base,
        lora=lora,
    )
    if batch_size is not None:
        result, chosen = planner.check(
            Settings(precision or "fp32", bool(checkpointing), optimizer or "adamw"),
            batch_size=batch_size,
            effective_batch_size=effective_batch_size,
            margin=margin,
            samples=samples,
        )
    else:
        result, chosen = planner.recommend(
            precision=precision,
            optimizer=optimizer,
            checkpointing=checkpointing,
            effective_batch_size=effective_batch_size,
            margin=margin,
            samples=samples,
            max_batch_size=max_batch_size,
        )
    if measure:
        result.measured = planner.measure(chosen)
    result.resolved.update(resolved)
    result.seconds = round(time.perf_counter() - started, 2)
    return result


def _resolve_for_target(profile: Any, optimizer: str | None, quantize_base: str | None, lora: Any) -> dict:
    """Device-dependent choices made for the target profile, never for the machine that plans:
    an optimizer that cannot run there is refused; a quantized base gets the target's backend."""
    from tightfit.models.qlora import resolve_quantize_base
    from tightfit.step.optim import check_optimizer_device

    check_optimizer_device(optimizer or "adamw", profile.device_type)
    resolved = {}
    if quantize_base is not None:
        backend = getattr(lora, "quant_backend", "auto") if lora is not None else "auto"
        base = resolve_quantize_base(quantize_base, profile.device_type, backend, check_installed=False)
        resolved["base"] = {"value": base.method, "backend": base.backend, "reason": base.reason}
    return resolved


def _check_arguments(batch_size, precision, optimizer, effective_batch_size, margin, samples, lora_rank) -> None:
    for name, value in (
        ("batch size", batch_size),
        ("effective batch size", effective_batch_size),
        ("samples", samples),
        ("LoRA rank", lora_rank),
    ):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
    if precision is not None and precision not in PRECISIONS:
        raise ConfigError(f"precision: unknown value {precision!r} (choose from {', '.join(PRECISIONS)})")
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer: unknown value {optimizer!r} (choose from {', '.join(OPTIMIZERS)})")
    if not 0 <= margin < 1:
        raise ConfigError(f"margin: must be in [0, 1), got {margin!r}")


# ------------------------------------------------------------------------------------ the engine


class _Planner:
    """One model, one input, one device; caches every estimate it makes."""

    def __init__(
        self,
        model_spec: str,
        input_spec: str,
        profile: Any,
        *,
        lora_rank: int | None,
        model_kwargs: dict,
        quantize_base: str | None = None,
        lora: Any = None,
    ):
        from tightfit.models.lora import LoRAConfig
        from tightfit.models.spec import build_model, make_batch_factory, parse_input_spec

        self.model_spec = model_spec
        self.input_spec = input_spec
        self.profile = profile
        self.model_kwargs = model_kwargs
        self.lora_rank = lora.rank if lora is not None else lora_rank
        # the run's LoRA section, with the quantized base the caller resolved for the device: the
        # meta model gets its adapters but no quantized base (counted instead, _on_quantized_base);
        # the real one measured by --measure is quantized, so the measurement is of the run train would do
        self.lora = None
        if self.lora_rank is not None:
            self.lora = (lora or LoRAConfig(rank=self.lora_rank)).model_copy(update={"quantize_base": quantize_base})
        self.inputs = parse_input_spec(input_spec)
        self.notes: list[str] = []
        # The batch factory probes the base model: adapters do not change inputs or outputs.
        self.batch_factory = make_batch_factory(self.inputs, build_model(model_spec, meta=True, **model_kwargs))
        self._build_real = lambda: build_model(model_spec, **model_kwargs)
        self.models: dict[bool, nn.Module] = {}
        model = self.model_for(False)
        self.quantize_base = self._quantize_base
        if self.lora_rank is not None:
            self.notes.append(f"LoRA rank {self.lora_rank}: base frozen, only adapters (and task heads) train")
        if self.quantize_base is not None:
            self.notes.append(f"{self.quantize_base} base: frozen Linear weights counted at their quantized size")
        self.blocks = _repeated_blocks(model)
        self.parameters = sum(parameter.numel() for parameter in model.parameters())
        self.trainable_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self._cache: dict[tuple[Settings, int, int], StepMemory] = {}  # (settings, batch, accumulation)

    def model_for(self, checkpointing: bool) -> nn.Module:
        """The meta model the run would train, prepared as the trainer prepares it
        (:func:`tightfit.models.prepare.prepare_model`), with activation checkpointing or without."""
        if checkpointing not in self.models:
            from tightfit.models.prepare import prepare_model

            prepared = prepare_model(
                self.model_spec,
                model_kwargs=self.model_kwargs,
                checkpointing=checkpointing,
                lora=self.lora,
                base_model=self.model_spec,
                for_planning=True,
                device_type=_device_type(self.profile, self.lora),
            )
            self._quantize_base = prepared.quantize_base
            self.models[checkpointing] = prepared.module
        return self.models[checkpointing]

    def estimate(self, settings: Settings, batch_size: int, accumulation_steps: int = 1) -> StepMemory:
        from tightfit.memory.estimator import EstimationError, estimate_step

        key = (settings, batch_size, accumulation_steps)
        if key not in self._cache:
            try:
                memory = estimate_step(
                    self.model_for(settings.checkpointing),
                    self.batch_factory,
                    batch_size=batch_size,
                    precision=settings.precision,
                    optimizer=settings.optimizer,
                    accumulation_steps=accumulation_steps,
                    profile=self.profile,
                )
            except EstimationError as error:
                memory = self._measure_instead(settings, batch_size, accumulation_steps, error)
            if self.quantize_base is not None:
                memory = self._on_quantized_base(memory, settings.precision)
            self._cache[key] = memory
        return self._cache[key]

    def _on_quantized_base(self, memory: StepMemory, precision: str) -> StepMemory:
        """The same step with the frozen Linear weights stored quantized: nothing can be quantized
        on the meta device, so the 16/32-bit estimate's base bytes are swapped for quantized ones."""
        from tightfit.memory.overhead import device_overhead
        from tightfit.models.qlora import with_quantized_base

        def overhead(tensor_peak: int) -> int:
            return device_overhead(self.profile, tensor_peak_bytes=tensor_peak).total_bytes

        breakdown, notes = with_quantized_base(
            memory.breakdown,
            self.models[False],
            self.quantize_base,
            overhead=overhead if self.profile else None,
            base_weight_bytes=2 if precision == "bf16-pure" else 4,
        )
        # the overhead was recomputed for the quantized peak: the estimate's own line is stale
        kept = [note for note in memory.notes if not note.startswith("device overhead")]
        if self.profile is not None and breakdown["overhead"]:
            tensor_peak = sum(value for key, value in breakdown.items() if key != "overhead")
            recomputed = device_overhead(self.profile, tensor_peak_bytes=tensor_peak)
            notes.append(f"{recomputed.describe()} (profile {self.profile.name}, on the quantized peak)")
        return dataclasses.replace(memory, peak_bytes=sum(breakdown.values()), breakdown=breakdown, notes=kept + notes)

    def _measure_instead(
        self, settings: Settings, batch_size: int, accumulation_steps: int, error: Exception
    ) -> StepMemory:
        """When tracing on fake tensors fails, measure real tensors on the CPU, if the model is small enough.

        The CPU measurement gives the tensor peak; the target device's overhead is added to it
        from the profile, as the estimator would have.
        """
        import psutil

        from tightfit.memory.estimator import EstimationError
        from tightfit.memory.measure import measure_step
        from tightfit.memory.overhead import device_overhead

        if 4 * self.parameters * 4 > psutil.virtual_memory().available:
            raise EstimationError(f"{error} (and the model is too large to measure on this machine)") from None
        measured = measure_step(
            self._real_model,
            self.batch_factory,
            batch_size=batch_size,
            precision=settings.precision,
            optimizer=settings.optimizer,
            checkpointing=self.blocks if settings.checkpointing else False,
            accumulation_steps=accumulation_steps,
            device="cpu",
        )
        overhead = device_overhead(self.profile, tensor_peak_bytes=measured.peak_bytes)
        breakdown = dict(measured.breakdown, overhead=overhead.total_bytes)
        notes = [f"fake-tensor estimate failed ({error}); measured on CPU with real tensors instead"]
        return StepMemory(
            peak_bytes=sum(breakdown.values()),
            breakdown=breakdown,
            by_module=measured.by_module,
            flops=measured.flops,
            method="measured",
            notes=notes + measured.notes,
            peak_moment=measured.peak_moment,
            moment_peaks=measured.moment_peaks,
        )

    def _real_model(self) -> nn.Module:
        from tightfit.models.prepare import prepare_model

        return prepare_model(self._build_real(), lora=self.lora, base_model=self.model_spec).module

    @property
    def estimates_made(self) -> int:
        return len(self._cache)

    # ------------------------------------------------------------------------- check one setting

    def check(
        self,
        settings: Settings,
        *,
        batch_size: int,
        effective_batch_size: int | None,
        margin: float,
        samples: int | None,
    ) -> PlanResult:
        if settings.checkpointing and not self.blocks:
            raise ConfigError(f"checkpointing: {self.model_spec} has no repeated blocks to checkpoint")
        accumulation_steps = math.ceil(effective_batch_size / batch_size) if effective_batch_size else 1
        memory = self.estimate(settings, batch_size, accumulation_steps)
        option = Option(settings, batch_size, accumulation_steps, batch_size * accumulation_steps, memory)
        self._time(option, samples)
        budget = self.profile.usable_bytes
        verdict = _verdict(memory.peak_bytes, budget, margin)
        why = _why(memory, budget, verdict, batch_size)
        if verdict == "does not fit":
            why += "; run without --batch-size for a configuration that fits"
        return self._result(
            option, batch_size, verdict, why, recommendation=None, alternatives=[], margin=margin
        ), option

    # -------------------------------------------------------------------- recommend a configuration

    def recommend(
        self,
        *,
        precision: str | None,
        optimizer: str | None,
        checkpointing: bool | None,
        effective_batch_size: int | None,
        margin: float,
        samples: int | None,
        max_batch_size: int,
    ) -> PlanResult:
        primary, fallback = self._candidates(precision, optimizer, checkpointing)
        threshold = int(self.profile.usable_bytes * (1 - margin))
        limit = min(effective_batch_size or max_batch_size, max_batch_size)
        options: list[Option] = []
        for settings in primary:
            options.append(self._option(settings, threshold, limit, effective_batch_size, samples, options))
        if not any(option.fits for option in options):
            # Nothing fits with the usual settings: try what trades accuracy or dynamics for memory.
            for settings in fallback:
                options.append(self._option(settings, threshold, limit, effective_batch_size, samples, options))
        fitting = [option for option in options if option.fits]
        preference = {settings: rank for rank, settings in enumerate(primary + fallback)}
        if fitting:
            fastest = min(option.seconds_per_sample for option in fitting)
            best = min(
                (option for option in fitting if option.seconds_per_sample <= fastest * (1 + TIME_TIE)),
                key=lambda option: (PRECISION_SAFETY[option.settings.precision], preference[option.settings]),
            )
        else:
            estimated = [option for option in options if option.memory is not None]
            if not estimated:
                # Every configuration was ruled out by its weights alone: estimate the most frugal
                # one at batch 1 so the answer still shows where the memory goes.
                frugal = min(
                    options,
                    key=lambda option: (
                        option.settings.precision != "bf16-pure",
                        not option.settings.checkpointing,
                        option.settings.optimizer != "sgd",
                    ),
                )
                frugal.memory = self.estimate(frugal.settings, 1)
                estimated = [frugal]
            best = min(estimated, key=lambda option: option.memory.peak_bytes)
        for option in options:
            if option is not best and not option.note:
                option.note = _cost(option, best)
        budget = self.profile.usable_bytes
        memory = best.memory
        if best.fits:
            verdict = _verdict(memory.peak_bytes, budget, margin)
            why = (
                f"fastest configuration that keeps {margin:.0%} headroom: micro-batch {best.micro_batch_size}"
                f"{' (capped by the effective batch)' if best.capped else ''}, {best.settings.label()}, "
                f"peak {format_bytes(memory.peak_bytes)} of {format_bytes(budget)}"
            )
            recommendation = {
                "micro_batch_size": best.micro_batch_size,
                "accumulation_steps": best.accumulation_steps,
                "effective_batch_size": best.effective_batch_size,
                "precision": best.settings.precision,
                "checkpointing": best.settings.checkpointing,
                "optimizer": best.settings.optimizer,
            }
        else:
            verdict = "does not fit"
            why = (
                f"even batch 1 with {best.settings.label()} needs {format_bytes(memory.peak_bytes)} "
                f"(with {margin:.0%} headroom: {format_bytes(threshold)} available): "
                f"{_largest_category(memory)}" + _suggestion(self.lora_rank, self.quantize_base)
            )
            recommendation = None
        alternatives = [option.to_dict() for option in options if option is not best]
        return self._result(
            best, best.micro_batch_size or None, verdict, why, recommendation, alternatives, margin
        ), best

    def _candidates(self, precision, optimizer, checkpointing) -> tuple[list[Settings], list[Settings]]:
        """Configurations to search: the usual ones first, then fallbacks used only when none fits."""
        device_type = self.profile.device_type
        if precision is not None:
            precisions, fallback_precisions = [precision], []
        else:
            mixed = []
            if device_type in ("cuda", "cpu") and self.profile.supports_bf16:
                mixed = ["bf16"]
            elif device_type in ("cuda", "mps") and self.profile.supports_fp16_autocast:
                mixed = ["fp16"]
            # On GPUs mixed precision comes first: half the activations, twice the matmul rate. On
            # the CPU fp32 does (see step.precision.resolve_precision): without AMX/AVX512-BF16
            # bf16 autocast is slower, so it is preferred only when fp32 does not fit.
            precisions = ["fp32"] + mixed if device_type == "cpu" else mixed + ["fp32"]
            # bf16 weights lose small updates (no fp32 master copy): a fallback, not a default.
            fallback_precisions = ["bf16-pure"] if self.profile.supports_bf16 or device_type == "cpu" else []
        if checkpointing is None:
            checkpointing_choices = [False, True] if self.blocks else [False]
        else:
            if checkpointing and not self.blocks:
                raise ConfigError(f"checkpointing: {self.model_spec} has no repeated blocks to checkpoint")
            checkpointing_choices = [checkpointing]
        optimizers = [optimizer or "adamw"]
        # SGD keeps no optimizer state: a fallback when AdamW's two fp32 slots per trainable
        # parameter are what does not fit; pointless for LoRA, whose adapters are tiny.
        fallback_optimizers = [] if optimizer or self.lora_rank else ["sgd"]
        primary = [Settings(p, c, o) for p in precisions for c in checkpointing_choices for o in optimizers]
        fallback = [Settings(p, c, o) for p in fallback_precisions for c in checkpointing_choices for o in optimizers]
        fallback += [
            Settings(p, c, o)
            for p in precisions + fallback_precisions
            for c in checkpointing_choices
            for o in fallback_optimizers
        ]
        return primary, fallback

    def _option(
        self,
        settings: Settings,
        threshold: int,
        limit: int,
        effective_batch_size: int | None,
        samples: int | None,
        earlier: list[Option],
    ) -> Option:
        # Checkpointing only trades time for memory: it is worth estimating when the same settings
        # without it fit no batch at all, or fall short of the effective batch in one micro-batch.
        if settings.checkpointing:
            plain = next((o for o in earlier if o.settings == dataclasses.replace(settings, checkpointing=False)), None)
            if plain is not None and plain.fits and (not effective_batch_size or plain.capped):
                reason = "reaches the effective batch" if effective_batch_size else "fits"
                return Option(settings, 0, note=f"not needed ({reason} without)", skipped=True)
        # A lower bound of the weights alone (a quantized base stores most weights in 4 or 8 bits).
        bytes_per_weight = {"nf4": 0.5, "int8": 1}.get(self.quantize_base) or (
            2 if settings.precision == "bf16-pure" else 4
        )
        weight_bytes = int(self.parameters * bytes_per_weight)
        if weight_bytes > threshold:
            return Option(settings, 0, note=f"weights alone {format_bytes(weight_bytes)} > budget")
        # Mixed precision first, then fp32: fp32 activations take at most twice the bytes, so half
        # the earlier answer is a good first probe.
        previous = [
            o.micro_batch_size
            for o in earlier
            if o.fits and o.settings.checkpointing == settings.checkpointing and not o.capped
        ]
        hint = max(1, previous[-1] // 2) if previous else None
        micro_batch_size = self.largest_fitting(settings, threshold, limit, hint=hint)
        if micro_batch_size == 0:
            return Option(settings, 0, memory=self.estimate(settings, 1), note="batch 1 does not fit")
        accumulation_steps, micro_batch_size = _accumulation(micro_batch_size, effective_batch_size)
        option = Option(
            settings,
            micro_batch_size,
            accumulation_steps,
            micro_batch_size * accumulation_steps,
            memory=self.estimate(settings, micro_batch_size),
            capped=micro_batch_size >= limit,
        )
        self._time(option, samples)
        return option

    def largest_fitting(self, settings: Settings, threshold: int, limit: int, hint: int | None = None) -> int:
        """The largest batch in ``[1, limit]`` whose estimated peak is at most ``threshold`` (0: none)."""
        fragmentation = float(getattr(self.profile, "overhead", {}).get("fragmentation", 0.0))
        return largest_fitting(
            lambda batch: self.estimate(settings, batch), threshold, highest=limit, hint=hint, growth=1 + fragmentation
        )

    # ------------------------------------------------------------------------------------ timing

    def _time(self, option: Option, samples: int | None) -> None:
        memory = option.memory
        if memory is None or memory.flops is None:
            return
        settings = option.settings
        device_type = self.profile.device_type
        flops_per_second = self.profile.flops_for(COMPUTE_DTYPE[settings.precision]) * UTILISATION[device_type]
        bandwidth = self.profile.memory_bandwidth or math.inf
        weight_bytes = self.parameters * (2 if settings.precision != "fp32" else 4)
        compute_s = memory.flops / flops_per_second if flops_per_second else math.inf
        micro_step_s = max(compute_s, 3 * weight_bytes / bandwidth)
        slot_bytes = 2 if settings.precision == "bf16-pure" else 4
        optimizer_bytes = self.trainable_parameters * slot_bytes * (2 + OPTIMIZER_SLOTS.get(settings.optimizer, 2))
        option.step_time_s = option.accumulation_steps * micro_step_s + 2 * optimizer_bytes / bandwidth
        if samples:
            option.epoch_time_s = math.ceil(samples / option.effective_batch_size) * option.step_time_s

    # ---------------------------------------------------------------------------------- measuring

    def measure(self, option: Option, steps: int = 3) -> dict:
        """Run real training steps of a planned configuration on this machine.

        Times ``steps`` micro-steps of the trainer's step (:class:`~tightfit.step.step.TrainingStep`)
        after one warm-up step, then measures the peak with real tensors
        (:func:`~tightfit.memory.measure.measure_step`).

        Raises:
            ConfigError: nothing fits, or the model's weights alone exceed this machine's memory.
        """
        import psutil

        from tightfit.hardware.detect import resolve_device
        from tightfit.memory.counted_step import StepSettings, make_step
        from tightfit.memory.measure import measure_step
        from tightfit.step.optim import build_optimizer

        if not option.micro_batch_size:
            raise ConfigError("--measure: no configuration fits, so there is nothing to measure")
        settings, batch_size = option.settings, option.micro_batch_size
        device = resolve_device(None)
        weight_bytes = 4 * self.parameters
        if device.type == "cpu" and weight_bytes > psutil.virtual_memory().available // 2:
            raise ConfigError(
                f"--measure: the model's weights alone ({format_bytes(weight_bytes)}) would take more than half of "
                f"this machine's free memory; measure it on the target device"
            )
        step_settings = StepSettings(batch_size, settings.precision, settings.optimizer)
        model = self._real_model()
        if settings.precision == "bf16-pure":
            model = model.to(torch.bfloat16)
        model = model.to(device)
        checkpointing = self.blocks if settings.checkpointing else False
        if checkpointing:
            from tightfit.models.checkpointing import apply_activation_checkpointing

            apply_activation_checkpointing(model, checkpointing)
        model.train()
        step = make_step(model, build_optimizer(settings.optimizer, model.parameters()), step_settings, device)
        window = self.batch_factory(batch_size, "cpu")
        step(window)  # warm-up: kernels, optimizer state
        _synchronize(device)
        started = time.perf_counter()
        for _ in range(steps):
            step(window)
        _synchronize(device)
        micro_step_s = (time.perf_counter() - started) / steps
        memory = measure_step(
            model,
            self.batch_factory,
            batch_size=batch_size,
            precision=settings.precision,
            optimizer=settings.optimizer,
            device=device,
        )
        return {
            "device": str(device),
            "batch_size": batch_size,
            "micro_step_time_s": micro_step_s,
            "step_time_s": micro_step_s * option.accumulation_steps,
            "peak_bytes": memory.peak_bytes,
            "breakdown": memory.breakdown,
            "steps_timed": steps,
        }

    # ------------------------------------------------------------------------------------ results

    def _result(
        self,
        option: Option,
        batch_size: int | None,
        verdict: str,
        why: str,
        recommendation: dict | None,
        alternatives: list[dict],
        margin: float,
    ) -> PlanResult:
        memory = option.memory
        notes = list(self.notes)
        notes.append(f"{plural(self.estimates_made, 'estimate')} on fake tensors (no weights allocated)")
        notes.append(f"times are estimates: {UTILISATION_SOURCE}")
        notes.extend(memory.notes)
        return PlanResult(
            model=self.model_spec,
            input=self.input_spec,
            device=self.profile.name,
            budget_bytes=self.profile.usable_bytes,
            margin=margin,
            batch_size=batch_size,
            peak_bytes=memory.peak_bytes,
            breakdown={name: memory.breakdown[name] for name in CATEGORIES},
            peak_moment=memory.peak_moment,
            fits=memory.peak_bytes <= self.profile.usable_bytes and option.fits,
            verdict=verdict,
            why=why,
            recommendation=recommendation,
            alternatives=alternatives,
            step_time_s=option.step_time_s,
            epoch_time_s=option.epoch_time_s,
            flops_per_step=memory.flops * option.accumulation_steps if memory.flops is not None else None,
            parameters=self.parameters,
            trainable_parameters=self.trainable_parameters,
            method=memory.method,
            notes=notes,
        )


# ------------------------------------------------------------------------------------- helpers


def _device_type(profile: Any, lora: Any) -> str:
    """The device type the planned run trains on, for resolving its quantized base."""
    if profile is not None and getattr(profile, "device_type", None):
        return profile.device_type
    return "cuda" if lora is not None and lora.quantize_base == "nf4" else "cpu"  # no target: as asked


def _repeated_blocks(model: nn.Module) -> list[str]:
    from tightfit.models.checkpointing import find_repeated_blocks

    return find_repeated_blocks(model)


def _accumulation(max_micro_batch: int, effective_batch_size: int | None) -> tuple[int, int]:
    """``(accumulation_steps, micro_batch_size)`` reaching ``effective_batch_size`` exactly if possible.

    The fewest accumulation steps whose micro-batch fits; among up to twice that many steps, one
    that divides the effective batch exactly is preferred, so the effective batch is not changed
    (rounding it up is the fallback, never shrinking it).
    """
    if not effective_batch_size:
        return 1, max_micro_batch
    fewest = math.ceil(effective_batch_size / max_micro_batch)
    for steps in range(fewest, 2 * fewest + 1):
        if effective_batch_size % steps == 0:
            return steps, effective_batch_size // steps
    return fewest, math.ceil(effective_batch_size / fewest)


def _suggestion(lora_rank: int | None, quantize_base: str | None) -> str:
    """What to try next when even batch 1 does not fit."""
    if lora_rank is None:
        return "; try --lora-rank or a smaller input"
    if quantize_base is None:
        return "; a 4-bit base (QLoRA, --quantize-base nf4) or a larger device is needed"
    return "; shorter inputs or a larger device are needed"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _verdict(peak_bytes: int, budget_bytes: int, margin: float) -> str:
    if peak_bytes > budget_bytes:
        return "does not fit"
    if budget_bytes - peak_bytes < margin * budget_bytes:
        return "tight"
    return "fits"


def _largest_category(memory: StepMemory) -> str:
    name, size = max(((name, memory.breakdown[name]) for name in CATEGORIES), key=lambda item: item[1])
    return f"the largest part is {name} ({format_bytes(size)})"


def _why(memory: StepMemory, budget: int, verdict: str, batch_size: int) -> str:
    headroom = budget - memory.peak_bytes
    if verdict == "does not fit":
        head = (
            f"peak {format_bytes(memory.peak_bytes)} exceeds the {format_bytes(budget)} usable by "
            f"{format_bytes(-headroom)}"
        )
    else:
        head = (
            f"peak {format_bytes(memory.peak_bytes)} of {format_bytes(budget)} usable "
            f"({headroom / budget:.0%} headroom)"
        )
    return f"{head} at batch {batch_size}; {_largest_category(memory)}"


def _cost(option: Option, best: Option) -> str:
    """What choosing ``option`` instead of ``best`` costs, in a few words."""
    if not option.fits:
        return option.note or "does not fit"
    if best.fits and math.isfinite(option.seconds_per_sample) and math.isfinite(best.seconds_per_sample):
        return f"{option.seconds_per_sample / best.seconds_per_sample:.2f}x time per sample"
    return ""
