"""Multi-process training under ``torchrun``: who this process is, how the model is shared, and
how ranks agree.

A single-device run never touches ``torch.distributed``. Under ``torchrun`` (``WORLD_SIZE`` > 1
in the environment) the process group is initialised once (NCCL on CUDA, gloo otherwise) with a
timeout, so a rank that dies never leaves the others waiting forever. The ``distributed.strategy``
setting then decides how the model is shared (docs/distributed.md):

* ``ddp``: every rank holds the whole model and reads its own shard of the data; the gradients
  are averaged as ``distributed.gradient_sync`` says:

  - ``overlap``: ``torch.nn.parallel.DistributedDataParallel`` all-reduces 25 MiB buckets of
    gradients while backward still runs, only in the step's last micro-batch (``no_sync`` on the
    others), with the gradients as views of its buckets (no second copy);
  - ``after_accumulation``: :func:`average_gradients` averages them once the step's
    micro-batches are done. Slower (nothing overlaps), but no rank is ever inside a collective
    while another fails, which is what lets the ranks agree on an out-of-memory error and all
    shrink the micro-batch (``auto`` picks it when a ``budget`` is set).

  In both, rank 0's buffers (BatchNorm statistics) go to every rank after each optimizer step
  (:func:`broadcast_buffers`), as DDP's ``broadcast_buffers`` does before each forward, so
  validation and checkpoints see the same statistics on every rank;
* ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) shards parameters, gradients and
  optimizer state; the repeated blocks that activation checkpointing finds are the units that are
  gathered one at a time.

Metrics are summed across ranks, and only rank 0 writes files and prints.
"""

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from tightfit.errors import ConfigError

# Gradients are averaged in buckets of about this many bytes: one flat copy of every gradient
# would double the gradient memory; DistributedDataParallel's default bucket is 25 MiB too.
BUCKET_BYTES = 25 * 2**20
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ProcessInfo:
    """Where this process sits in a (possibly one-process) run."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs and the summary; the others only compute."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_process(device_type: str, timeout_s: float = 600.0) -> ProcessInfo:
    """Read torchrun's environment and join the process group when there is more than one process.

    Args:
        device_type: ``"cuda"`` selects the NCCL backend; anything else uses gloo.
        timeout_s: how long a collective may wait for the other ranks before every rank fails
            with an error (a rank killed mid-run must not leave the others hanging).

    Returns:
        The process's rank, local rank and world size (``ProcessInfo()`` outside torchrun).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return ProcessInfo()
    info = ProcessInfo(
        rank=int(os.environ["RANK"]), local_rank=int(os.environ.get("LOCAL_RANK", "0")), world_size=world_size
    )
    _exit_with_launcher()
    if device_type == "cuda":
        # NCCL only honours the timeout when errors are handled asynchronously (the default in
        # recent torch; set here so an older environment variable cannot turn it off).
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device_type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s)
        )
    return info


def _exit_with_launcher() -> None:
    """End this worker when its torchrun launcher dies (Linux).

    torchrun starts its workers in their own sessions, so a SIGKILL of the launcher (of the job's
    main process, as a scheduler does) would leave them training on alone, still writing
    checkpoints that a restarted job then races with. The parent-death signal ends them instead.
    """
    if sys.platform != "linux" or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher died before the signal was armed
        os._exit(1)


def teardown_process(info: ProcessInfo, synchronize: bool = False) -> None:
    """Leave the process group this run joined (a no-op for single-process runs).

    Args:
        info: this process.
        synchronize: wait at a barrier first (a run that ended well: every rank is here), so no
            rank destroys the group, and exits, while another still has a collective in flight
            with it. Not after an error: a dead rank would hold the others at the barrier until
            the timeout.
    """
    if not (info.distributed and dist.is_initialized()):
        return
    try:
        if synchronize:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def resolve_strategy(strategy: str, info: ProcessInfo) -> str:
    """``"single"``, ``"ddp"`` or ``"fsdp"``: what ``distributed.strategy`` means for this launch.

    ``auto`` is one process alone and DDP under torchrun. In one process ``ddp`` is the same as
    one process; ``fsdp`` stays ``fsdp`` (nothing is sharded, but checkpoints are sharded ones).
    """
    if strategy == "fsdp":
        return "fsdp"
    return "ddp" if info.distributed else "single"


# ------------------------------------------------------------------------------ sharing the model
def shard_model(
    model: nn.Module,
    blocks: list[str],
    *,
    param_dtype: str = "fp32",
    reduce_dtype: str = "fp32",
    cpu_offload: bool = False,
) -> list[str]:
    """Shard ``model`` in place with FSDP2: each repeated block is a unit, then the root.

    A unit's parameters are gathered just before its forward (and again for its backward) and
    freed after, so at most a block or two is whole at a time. Activation checkpointing applied
    before (``models/checkpointing.py``) composes: the recomputation runs inside the gathered unit.

    Args:
        model: the model, on its device, with checkpointing and LoRA already applied.
        blocks: module names of the repeated blocks (``find_repeated_blocks``); may be empty.
        param_dtype: dtype of the gathered parameters in forward and backward (fp32, bf16, fp16).
        reduce_dtype: dtype of the gradient reduce-scatter.
        cpu_offload: keep the sharded parameters, gradients and optimizer state in CPU memory.

    Returns:
        The names of the sharded units, the root last (``""``).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype])
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    modules = dict(model.named_modules())
    for name in blocks:
        fully_shard(modules[name], mp_policy=policy, offload_policy=offload)
    fully_shard(model, mp_policy=policy, offload_policy=offload)
    return [*blocks, ""]


def resolve_gradient_sync(setting: str, *, budgeted: bool) -> str:
    """``overlap`` or ``after_accumulation``: what ``distributed.gradient_sync`` means for a ddp run.

    ``auto`` is ``after_accumulation`` when a rank has a memory ``budget`` (``budgeted``: a run
    expecting to meet its limit, whose ranks must be able to agree on an out-of-memory error),
    else ``overlap``.
    """
    if setting != "auto":
        return setting
    return "after_accumulation" if budgeted else "overlap"


def wrap_data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` under ``DistributedDataParallel`` (rank 0's parameters and buffers copied to all).

    DDP's gradient buckets live through the whole step beside the gradients (the per-rank plan
    adds them, ``memory/distributed.py``); buffers are broadcast by :func:`broadcast_buffers` after
    each step rather than by DDP before each forward, so every rank ends a step with the same ones.
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # torch 2.14 renamed broadcast_buffers (buffers are still synced once at construction)
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    return DistributedDataParallel(
        model,
        device_ids=[device.index or 0] if device.type == "cuda" else None,
        bucket_cap_mb=BUCKET_BYTES / 2**20,
        gradient_as_bucket_view=True,
        **{"forward_sync_buffers" if renamed else "broadcast_buffers": False},
    )


def replicate_model(model: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (the start of a ``ddp`` run)."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor, src=0)


def gradient_sync_context(model: nn.Module, last_micro_batch: bool) -> contextlib.AbstractContextManager:
    """The context one micro-batch's forward and backward run in, for gradient accumulation.

    Under FSDP2 the gradients are reduce-scattered only in the last micro-batch of a step (the
    others accumulate unsharded gradients locally); under ``DistributedDataParallel`` the other
    micro-batches run in ``no_sync``. With ``after_accumulation`` and in one process nothing
    communicates during backward (:func:`average_gradients` runs after the micro-batches), so the
    context is empty.

    Args:
        model: the model as trained (sharded in place for FSDP).
        last_micro_batch: whether this micro-batch is the step's last.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, FSDPModule):
        return _fsdp_gradient_sync(model, last_micro_batch)
    if isinstance(model, DistributedDataParallel) and not last_micro_batch:
        return model.no_sync()
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_gradient_sync(model, enabled: bool) -> Iterator[None]:
    model.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def average_gradients(model: nn.Module, device: torch.device, info: ProcessInfo) -> None:
    """Average every trainable parameter's gradient across ranks (``ddp``), in buckets.

    Every rank walks the same parameters in the same order, so the buckets match; a parameter
    without a gradient on this rank (unused in its forward) contributes zeros, as in DDP.
    """
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    bucket: list[nn.Parameter] = []
    bucket_bytes = 0
    for parameter in parameters:
        if bucket and (parameter.dtype != bucket[0].dtype or bucket_bytes + _nbytes(parameter) > BUCKET_BYTES):
            _average_bucket(bucket, info)
            bucket, bucket_bytes = [], 0
        bucket.append(parameter)
        bucket_bytes += _nbytes(parameter)
    if bucket:
        _average_bucket(bucket, info)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _average_bucket(bucket: list[nn.Parameter], info: ProcessInfo) -> None:
    for parameter in bucket:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    flat = torch.cat([parameter.grad.reshape(-1) for parameter in bucket])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    offset = 0
    for parameter in bucket:
        count = parameter.numel()
        parameter.grad.copy_(flat[offset : offset + count].view_as(parameter.grad))
        offset += count


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) to every rank, one flat broadcast per dtype.

    DDP's ``broadcast_buffers`` does this before each forward; after each optimizer step (the
    trainer's place for it) the statistics are the same on every rank also when validation and
    checkpoints read them. One broadcast per buffer would cost a round trip each (resnet18 has 60).
    """
    by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for buffer in model.buffers():
        by_dtype.setdefault((buffer.dtype, buffer.device), []).append(buffer)
    with torch.no_grad():
        for buffers in by_dtype.values():
            flat = torch.cat([buffer.reshape(-1) for buffer in buffers])
            dist.broadcast(flat, src=0)
            offset = 0
            for buffer in buffers:
                buffer.copy_(flat[offset : offset + buffer.numel()].view_as(buffer))
                offset += buffer.numel()


# ------------------------------------------------------------------------------ agreeing
class OutOfMemoryOnAnotherRank(RuntimeError):
    """Raised on a rank with memory to spare when another rank ran out of memory in the same
    window: every rank then shrinks its micro-batch together and redoes the window."""

    def __init__(self):
        super().__init__("out of memory on another rank")


def sum_across_processes(values: list[float], device: torch.device, info: ProcessInfo) -> list[float]:
    """Sum a few numbers over all ranks (metric numerators and sample counts), in float64."""
    if not info.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def any_across_processes(flag: bool, device: torch.device, info: ProcessInfo) -> bool:
    """Whether ``flag`` is true on any rank, so every rank takes the same branch (e.g. out of memory)."""
    if not info.distributed:
        return flag
    return sum_across_processes([float(flag)], device, info)[0] > 0


def mean_across_processes(value: float, device: torch.device, info: ProcessInfo) -> float:
    """The mean of every rank's ``value`` (a window's loss: windows have as many samples on every rank)."""
    return sum_across_processes([value], device, info)[0] / info.world_size


def min_across_processes(value: int, device: torch.device, info: ProcessInfo) -> int:
    """The smallest of every rank's ``value`` (a micro-batch size each rank found on its own)."""
    if not info.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def broadcast_object(value, info: ProcessInfo):
    """Rank 0's ``value`` on every rank (a run folder named after the time each rank read)."""
    if not info.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_across_processes(value: float | None, device: torch.device, info: ProcessInfo) -> list[float | None]:
    """Every rank's ``value`` (a peak in bytes), by rank; ``None`` where a rank has none."""
    if not info.distributed:
        return [value]
    tensor = torch.tensor([-1.0 if value is None else float(value)], dtype=torch.float64, device=device)
    gathered = [torch.zeros_like(tensor) for _ in range(info.world_size)]
    dist.all_gather(gathered, tensor)
    return [None if item.item() < 0 else item.item() for item in gathered]


def lost_peer_message(error: BaseException, info: ProcessInfo) -> str | None:
    """One line for a collective that failed because another rank is gone, else None.

    A rank that dies leaves the others' pending collective to fail (gloo: the connection is reset;
    NCCL, or a rank that hangs: the process group's timeout); that is not this rank's bug, and a
    traceback through FSDP's internals would hide what happened.
    """
    if not info.distributed:
        return None
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and ("gloo" in text or "NCCL" in text)):
        return f"rank {info.rank}: another rank stopped answering during a collective ({text[:200]})"
    return None


def check_strategy(strategy: str, *, device_type: str, cpu_offload: bool, precision: str) -> None:
    """Refuse settings FSDP cannot honour here, with the setting's name.

    Raises:
        ConfigError: CPU offload without CUDA, or fp16 (whose gradient scaler does not handle
            sharded gradients) under FSDP.
    """
    if strategy != "fsdp":
        return
    if cpu_offload and device_type != "cuda":
        raise ConfigError(
            "distributed.cpu_offload: only meaningful when training on CUDA (the model is on the CPU already)"
        )
    if precision == "fp16" and device_type == "cuda":
        raise ConfigError(
            "precision: fp16 under distributed.strategy=fsdp is not supported (its gradient scaler needs whole "
            "gradients); use bf16"
        )
