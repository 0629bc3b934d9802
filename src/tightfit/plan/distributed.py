"""Per-rank memory and time of a training step shared by N devices (DDP or FSDP2).

One estimate of the whole step on one device (:func:`tightfit.memory.estimator.estimate_step`,
fake tensors, at the per-rank micro-batch) gives the four categories at the peak: parameters P,
gradients G, optimizer state O and activations A. What each rank then holds follows from how the
strategy shares the model (``training/distributed.py`` does exactly this):

* ``ddp`` with ``gradient_sync: after_accumulation``: every rank holds the whole step; after the
  micro-batches the gradients are averaged in buckets of at most 25 MiB (one flat copy of a bucket
  is live), so ``peak = max(single peak, P + G + O + bucket)``.
* ``ddp`` with ``gradient_sync: overlap`` (``DistributedDataParallel``): its gradient buckets, G
  bytes, live through the whole step beside the gradients autograd makes (the step's
  ``zero_grad(set_to_none=True)`` unhooks the ``.grad`` views, so backward makes new ones and DDP
  copies them in), so ``peak = single peak + G`` (measured to 0.01 % on 2 gloo ranks).
* ``fsdp``: parameters, gradients and optimizer state are sharded, ``(P + G + O) / N``; the
  activations of the rank's micro-batch are its own, ``A``; on top come the **units in flight**:
  FSDP2 keeps the root unit (everything outside the repeated blocks: embeddings, head) gathered
  from forward to backward, and gathers a block while prefetching the next, each into a flat
  all-gather output that is then copied out into the block's parameters (three blocks, in the
  gather dtype); and the **reduce-scatter buffers**: a block's unsharded gradients plus the flat
  copy reduce-scatter reads (two blocks' gradients, in the reduce dtype). That is the peak during
  forward and backward, with ``A`` taken from a second estimate of the step with plain SGD (whose
  update allocates nothing, so its peak is in backward). During the optimizer's update the rank
  holds its shards and the update's temporaries for them (foreach kernels on CUDA): the one-device
  peak / N. The per-rank peak is the larger of the two.

The FSDP figure adds these terms to categories taken at the one-device peak, so it is an upper
bound: the gathered units and the reduce-scatter buffers are not all live at the peak moment
(checked against a tracked FSDP step on two gloo ranks in ``benchmarks/memory_accuracy.py``).

**Time**: compute is the micro-batch's counted FLOPs at the profile's peak FLOP/s and the planner's
utilisation; communication is a ring collective's traffic per rank over the profile's
``interconnect_bandwidth``: FSDP all-gathers the parameters twice per micro-batch (forward and
backward) and reduce-scatters the gradients once per step, each moving ``(N - 1) / N`` of the
bytes; DDP all-reduces the gradients once per step, ``2 (N - 1) / N`` of the bytes. FSDP overlaps
communication with compute (step = the longer of the two); DDP, which averages after backward,
adds them.
"""

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from tightfit.errors import ConfigError
from tightfit.memory.report import StepMemory
from tightfit.names import STRATEGIES

BUCKET_BYTES = 25 * 2**20  # tightfit.training.distributed.BUCKET_BYTES (not imported: it imports torch.distributed)
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
MAX_DEVICES = 1024
TRACKED = ("parameters", "gradients", "optimizer", "optimizer_temporaries", "activations")  # the tracker's categories


@dataclass
class RankPlan:
    """What one rank of an N-device run holds and how fast the run goes.

    Attributes:
        strategy: ``ddp`` or ``fsdp``.
        devices: N, the number of ranks.
        device: the profile's name.
        peak_bytes: the per-rank peak, overhead included.
        breakdown: bytes per category: ``parameters``, ``gradients``, ``optimizer`` (sharded for
            FSDP), ``activations``, ``units_in_flight`` (gathered FSDP units), ``communication``
            (reduce-scatter or DDP bucket buffers), ``overhead`` (the device's).
        usable_bytes: the profile's usable memory.
        fits: the peak stays under ``usable x (1 - margin)``.
        step_time_s: estimated seconds per optimizer step (compute and communication).
        compute_s: of which compute.
        communication_s: of which communication (overlapped with compute for FSDP).
        tokens_per_s: samples x tokens per sample (or samples when the input has no tokens) per
            second over all ranks.
        notes: how the figure was made.
    """

    strategy: str
    devices: int
    device: str
    peak_bytes: int
    breakdown: dict[str, int]
    usable_bytes: int
    fits: bool
    step_time_s: float | None
    compute_s: float | None
    communication_s: float | None
    tokens_per_s: float | None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelShape:
    """What the per-rank arithmetic needs to know about the model (bytes as trained)."""

    parameter_bytes: int  # all parameters, in their stored dtype
    trainable_bytes: int
    largest_block_parameters: int  # parameter count of the largest repeated block
    root_parameters: int  # parameters outside every repeated block (FSDP's root unit)
    parameter_count: int


def fsdp_param_dtype(param_dtype: str, precision: str, model: Any = None) -> str:
    """The dtype FSDP gathers parameters in: ``auto`` follows the run's precision.

    Except under autocast (``bf16``, ``fp16``) for a model with BatchNorm: its running statistics
    stay fp32 and the batch-norm kernel refuses low-precision weights beside them, so ``auto``
    gathers in fp32 there (autocast still runs the matrix products in low precision).
    """
    if param_dtype != "auto":
        return param_dtype
    from torch import nn

    has_batch_norm = model is not None and any(
        isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules()
    )
    if has_batch_norm and precision in ("bf16", "fp16"):
        return "fp32"
    return {"bf16": "bf16", "bf16-pure": "bf16", "fp16": "fp16"}.get(precision, "fp32")


def parse_devices(text: str) -> tuple[int | None, str]:
    """``"4xa100-40gb"`` -> ``(4, "a100-40gb")``; ``"a100-40gb"`` -> ``(None, "a100-40gb")``.

    Raises:
        ConfigError: a count that is not a positive integer.
    """
    match = re.fullmatch(r"\s*(?:(\d+)\s*[x*]\s*)?(.+?)\s*", text)
    if not match or not match.group(2):
        raise ConfigError(f"--devices: expected NxPROFILE such as 4xa100-40gb, got {text!r}")
    count = int(match.group(1)) if match.group(1) else None
    if count is not None and not 1 <= count <= MAX_DEVICES:
        raise ConfigError(f"--devices: the count must be between 1 and {MAX_DEVICES}, got {count}")
    return count, match.group(2)


def model_shape(model: Any, blocks: list[str]) -> ModelShape:
    """Sizes of ``model`` (a meta model is fine) and of its repeated blocks."""
    modules = dict(model.named_modules())
    block_counts = [sum(parameter.numel() for parameter in modules[name].parameters()) for name in blocks]
    total = sum(parameter.numel() for parameter in model.parameters())
    return ModelShape(
        parameter_bytes=sum(parameter.numel() * parameter.element_size() for parameter in model.parameters()),
        trainable_bytes=sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
        largest_block_parameters=max(block_counts, default=0),
        root_parameters=total - sum(block_counts),
        parameter_count=total,
    )


def per_rank_memory(
    single: StepMemory,
    shape: ModelShape,
    *,
    strategy: str,
    devices: int,
    profile: Any,
    param_dtype: str = "bf16",
    reduce_dtype: str = "fp32",
    backward_activations: int | None = None,
    gradient_sync: str = "after_accumulation",
) -> tuple[int, dict[str, int], list[str]]:
    """The per-rank peak and breakdown from the one-device estimate (see the module doc).

    Args:
        single: the estimate of the whole step on one device at the per-rank micro-batch.
        shape: the model's sizes.
        strategy: ``ddp`` or ``fsdp``.
        devices: N.
        profile: the target ``DeviceProfile`` (its overhead is recomputed for the per-rank peak).
        param_dtype: FSDP's gather dtype; ``reduce_dtype``: its reduce-scatter dtype.
        backward_activations: FSDP: the activations at the peak of forward and backward alone
            (an estimate of the same step with plain SGD, whose update allocates nothing);
            default: ``single``'s activations, when its peak is not in the optimizer step.
        gradient_sync: DDP's ``overlap`` or ``after_accumulation`` (``training/distributed.py``).

    Returns:
        ``(peak_bytes, breakdown, notes)``.
    """
    from tightfit.memory.overhead import device_overhead

    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy: unknown value {strategy!r} (choose from {', '.join(STRATEGIES)})")
    parts = single.breakdown
    if strategy == "ddp" and gradient_sync == "overlap" and devices > 1:
        breakdown = {
            **{name: parts[name] for name in TRACKED},
            "units_in_flight": 0,
            "communication": shape.trainable_bytes,
        }
        notes = [
            "ddp (overlap): DistributedDataParallel's gradient buckets, as large as the gradients, "
            "live through the step"
        ]
    elif strategy == "ddp":
        states = parts["parameters"] + parts["gradients"] + parts["optimizer"]
        bucket = min(BUCKET_BYTES, parts["gradients"]) if devices > 1 else 0
        after_backward = states + bucket
        if after_backward > single.tensor_bytes:
            breakdown = {
                "parameters": parts["parameters"],
                "gradients": parts["gradients"],
                "optimizer": parts["optimizer"],
                "optimizer_temporaries": 0,
                "activations": 0,
                "units_in_flight": 0,
                "communication": bucket,
            }
            notes = ["ddp: the peak is while gradients are averaged (after backward), with one bucket copy live"]
        else:
            breakdown = {**{name: parts[name] for name in TRACKED}, "units_in_flight": 0, "communication": 0}
            notes = ["ddp: every rank holds the whole step; the gradient bucket fits under the backward peak"]
    else:
        gather = DTYPE_BYTES[param_dtype]
        reduce = DTYPE_BYTES[reduce_dtype]
        # root + the block computing + the block prefetched + the all-gather output being copied out
        in_flight = (shape.root_parameters + 3 * shape.largest_block_parameters) * gather if devices > 1 else 0
        buffers = 2 * shape.largest_block_parameters * reduce if devices > 1 else 0
        sharded = {name: math.ceil(parts[name] / devices) for name in ("parameters", "gradients", "optimizer")}
        during_backward = {
            **sharded,
            "optimizer_temporaries": 0,
            "activations": parts["activations"] + parts["optimizer_temporaries"]
            if backward_activations is None
            else backward_activations,
            "units_in_flight": in_flight,
            "communication": buffers,
        }
        # the optimizer updates this rank's shards only: its temporaries (foreach kernels) shrink too
        during_update = {
            **sharded,
            "optimizer_temporaries": math.ceil(parts["optimizer_temporaries"] / devices),
            "activations": math.ceil(parts["activations"] / devices),
            "units_in_flight": 0,
            "communication": 0,
        }
        in_update = sum(during_update.values()) > sum(during_backward.values())
        breakdown = during_update if in_update else during_backward
        notes = [
            f"fsdp over {devices}: parameters, gradients and optimizer state / {devices}; "
            + (
                "the peak is in the optimizer step, whose temporaries are sharded too"
                if in_update
                else f"gathered: the root unit ({shape.root_parameters:,} parameters) and three blocks "
                f"({shape.largest_block_parameters:,} each) in {param_dtype}; reduce-scatter: two blocks' gradients "
                f"in {reduce_dtype} (an upper bound: not all live at the peak)"
            )
        ]
    tensor_bytes = sum(breakdown.values())
    overhead = device_overhead(profile, tensor_peak_bytes=tensor_bytes)
    breakdown["overhead"] = overhead.total_bytes
    return tensor_bytes + overhead.total_bytes, breakdown, notes


def step_time(
    single: StepMemory,
    shape: ModelShape,
    *,
    strategy: str,
    devices: int,
    profile: Any,
    compute_dtype: str,
    accumulation_steps: int = 1,
    param_dtype: str = "bf16",
    reduce_dtype: str = "fp32",
    gradient_sync: str = "after_accumulation",
) -> tuple[float | None, float | None, float | None, list[str]]:
    """``(step_s, compute_s, communication_s, notes)`` for one optimizer step (see the module doc)."""
    from tightfit.plan.planner import UTILISATION

    if single.flops is None:
        return None, None, None, ["no FLOP count: no time estimate"]
    rate = profile.flops_for(compute_dtype) * UTILISATION[profile.device_type]
    compute_s = accumulation_steps * single.flops / rate if rate else math.inf
    if devices == 1:
        return compute_s, compute_s, 0.0, []
    bandwidth = getattr(profile, "interconnect_bandwidth", None)
    if not bandwidth:
        return (
            None,
            compute_s,
            None,
            [f"{profile.name} has no interconnect bandwidth in its profile: no communication time"],
        )
    share = (devices - 1) / devices
    trainable_count = shape.parameter_count * shape.trainable_bytes / max(shape.parameter_bytes, 1)
    if strategy == "fsdp":
        traffic = share * (
            2 * accumulation_steps * shape.parameter_count * DTYPE_BYTES[param_dtype]
            + trainable_count * DTYPE_BYTES[reduce_dtype]
        )
        communication_s = traffic / bandwidth
        step_s = max(compute_s, communication_s)
        note = "fsdp: all-gathers and reduce-scatters overlap compute (step = the longer)"
    else:
        gradient_bytes = single.breakdown["gradients"]
        communication_s = 2 * share * gradient_bytes / bandwidth
        if gradient_sync == "overlap":
            # the last micro-batch's backward (about 2/3 of its compute) hides the all-reduce
            hidden = min(communication_s, (2 / 3) * compute_s / accumulation_steps)
            step_s = compute_s + communication_s - hidden
            note = "ddp (overlap): the all-reduce runs during the last micro-batch's backward"
        else:
            step_s = compute_s + communication_s
            note = "ddp: gradients averaged after backward (step = compute + all-reduce)"
    return (
        step_s,
        compute_s,
        communication_s,
        [f"{note}; ring traffic over {bandwidth / 1e9:.0f} GB/s per device ({profile.name} interconnect)"],
    )


@dataclass
class DistributedPlan:
    """The answer of :func:`plan_distributed`; ``to_dict()`` is what ``plan --json`` prints.

    Attributes:
        model, input, device, strategy: what was planned.
        devices_asked: N given with ``--devices NxPROFILE``, or None (then the search's answer).
        devices_needed: the smallest N whose per-rank peak fits (None: none up to ``max_devices``).
        rows: one :class:`RankPlan` per N considered, ascending.
        single: the one-device estimate the rows derive from.
    """

    model: str
    input: str
    device: str
    strategy: str
    micro_batch_size: int
    precision: str
    checkpointing: bool
    optimizer: str
    devices_asked: int | None
    devices_needed: int | None
    rows: list[RankPlan]
    single: dict
    parameters: int
    trainable_parameters: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def plan_distributed(
    model_spec: str,
    input_spec: str,
    *,
    devices: str | int | None,
    strategy: str = "fsdp",
    batch_size: int = 1,
    precision: str = "bf16-pure",
    optimizer: str = "adamw",
    checkpointing: bool = True,
    lora_rank: int | None = None,
    accumulation_steps: int = 1,
    param_dtype: str = "auto",
    reduce_dtype: str = "fp32",
    margin: float = 0.1,
    max_devices: int = 64,
    model_kwargs: dict | None = None,
    profile: Any = None,
    gradient_sync: str = "overlap",
) -> DistributedPlan:
    """Plan a step shared by several devices of one kind: each rank's peak, and how many are needed.

    Args:
        model_spec, input_spec: as for :func:`tightfit.plan.planner.plan`.
        devices: ``NxPROFILE`` (plan exactly N ranks) or ``PROFILE`` (find the smallest N that fits);
            with ``profile`` given, the count N alone, or None (find it).
        strategy: ``fsdp`` or ``ddp``.
        batch_size: the micro-batch of each rank.
        precision, optimizer, checkpointing, lora_rank, accumulation_steps: the run's settings.
        param_dtype: FSDP's gather dtype (``auto`` follows ``precision``); ``reduce_dtype`` its reduce dtype.
        margin: headroom kept free, as in ``plan``.
        max_devices: the largest N the search tries.
        profile: a ``DeviceProfile`` to plan for instead of a named one (a pipeline's device).
        gradient_sync: DDP's ``overlap`` (a ddp run's default) or ``after_accumulation`` (its default
            under a ``budget``).

    Returns:
        A :class:`DistributedPlan`.

    Raises:
        ConfigError: bad settings; SpecError: bad model or input spec or profile name.

    Example:
        >>> plan_distributed("hf:packaged:llama-7b", "tokens:2048", devices="a100-40gb").devices_needed
    """
    import torch

    from tightfit.hardware.profiles import get_profile
    from tightfit.memory.estimator import estimate_step
    from tightfit.models.checkpointing import apply_activation_checkpointing, find_repeated_blocks
    from tightfit.models.spec import build_model, make_batch_factory, parse_input_spec
    from tightfit.plan.planner import COMPUTE_DTYPE

    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy: unknown value {strategy!r} (choose from {', '.join(STRATEGIES)})")
    if not 0 <= margin < 1:
        raise ConfigError(f"margin: must be in [0, 1), got {margin!r}")
    if profile is None:
        count, profile_name = parse_devices(str(devices))
        profile = get_profile(profile_name)
    else:
        count = None if devices is None else int(devices)

    model = build_model(model_spec, meta=True, **(model_kwargs or {}))
    batch_factory = make_batch_factory(parse_input_spec(input_spec), model)
    blocks = find_repeated_blocks(model)
    if checkpointing:
        apply_activation_checkpointing(model, blocks)
    if lora_rank is not None:
        from tightfit.models.lora import LoRAConfig, apply_lora

        model = apply_lora(model, LoRAConfig(rank=lora_rank), verbose=False)
        blocks = find_repeated_blocks(model)
    if precision == "bf16-pure":
        model = model.to(dtype=torch.bfloat16)  # meta: only the sizes change
    shape = model_shape(model, blocks)
    gather_dtype = fsdp_param_dtype(param_dtype, precision, model)
    single = estimate_step(
        model,
        batch_factory,
        batch_size=batch_size,
        precision=precision,
        optimizer=optimizer,
        accumulation_steps=accumulation_steps,
        profile=profile,
    )
    backward_activations = None
    if strategy == "fsdp" and optimizer != "sgd":
        # The same step with plain SGD (no state, an update without temporaries): its peak is in
        # forward/backward, so its activations are those a sharded rank holds there; the first
        # estimate's peak may be the optimizer's update, whose temporaries FSDP shards.
        backward_activations = estimate_step(
            model,
            batch_factory,
            batch_size=batch_size,
            precision=precision,
            optimizer="sgd",
            accumulation_steps=accumulation_steps,
            profile=profile,
            count_flops=False,
        ).breakdown
        backward_activations = backward_activations["activations"] + backward_activations["optimizer_temporaries"]
    tokens = _tokens_per_sample(input_spec)
    budget = profile.usable_bytes * (1 - margin)

    def row(n: int) -> RankPlan:
        peak, breakdown, notes = per_rank_memory(
            single,
            shape,
            strategy=strategy,
            devices=n,
            profile=profile,
            param_dtype=gather_dtype,
            reduce_dtype=reduce_dtype,
            backward_activations=backward_activations,
            gradient_sync=gradient_sync,
        )
        step_s, compute_s, communication_s, time_notes = step_time(
            single,
            shape,
            strategy=strategy,
            devices=n,
            profile=profile,
            compute_dtype=COMPUTE_DTYPE[precision],
            accumulation_steps=accumulation_steps,
            param_dtype=gather_dtype,
            reduce_dtype=reduce_dtype,
            gradient_sync=gradient_sync,
        )
        samples = batch_size * accumulation_steps * n
        return RankPlan(
            strategy=strategy,
            devices=n,
            device=profile.name,
            peak_bytes=peak,
            breakdown=breakdown,
            usable_bytes=profile.usable_bytes,
            fits=peak <= budget,
            step_time_s=step_s,
            compute_s=compute_s,
            communication_s=communication_s,
            tokens_per_s=samples * tokens / step_s if step_s else None,
            notes=notes + time_notes,
        )

    if count is not None:
        rows = [row(count)]
        needed = count if rows[0].fits else None
    else:
        rows, needed, n = [], None, 1
        while n <= max_devices:
            rows.append(row(n))
            if rows[-1].fits:
                needed = n
                break
            if strategy == "ddp" and n > 1:
                break  # ddp does not shard: more devices never lower the per-rank peak
            n *= 2
    notes = [
        f"one-device estimate at micro-batch {batch_size}: {single.peak_bytes / 2**30:.2f} GiB "
        f"({', '.join(f'{name} {value / 2**30:.2f}' for name, value in single.breakdown.items())} GiB)",
        f"fits = per-rank peak <= {1 - margin:.0%} of {profile.usable_bytes / 2**30:.1f} GiB usable",
    ]
    if count is None and needed is None:
        notes.append(
            f"no count up to {rows[-1].devices} fits with {strategy}"
            + (" (ddp replicates the whole step)" if strategy == "ddp" else "")
        )
    return DistributedPlan(
        model=model_spec,
        input=input_spec,
        device=profile.name,
        strategy=strategy,
        micro_batch_size=batch_size,
        precision=precision,
        checkpointing=checkpointing,
        optimizer=optimizer,
        devices_asked=count,
        devices_needed=needed,
        rows=rows,
        single=single.to_dict() | {"by_module": {}},
        parameters=shape.parameter_count,
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        notes=notes,
    )


def _tokens_per_sample(input_spec: str) -> int:
    """Tokens in one sample for ``tokens:N`` inputs; 1 otherwise (tokens/s is then samples/s)."""
    match = re.search(r"tokens:(\d+)", input_spec)
    return int(match.group(1)) if match else 1
