"""Multi-process training under ``torchrun``: who this process is, and sums across processes.

A single-device run never touches ``torch.distributed``. Under ``torchrun`` (``WORLD_SIZE`` > 1
in the environment) the process group is initialised once (NCCL on CUDA, gloo otherwise), the
model is wrapped in DistributedDataParallel, each rank reads its own shard of the data, metrics
are summed across ranks, and only rank 0 writes files and prints.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def setup_process(device_type: str) -> ProcessInfo:
    """Read torchrun's environment and join the process group when there is more than one process.

    Args:
        device_type: ``"cuda"`` selects the NCCL backend; anything else uses gloo.

    Returns:
        The process's rank, local rank and world size (``ProcessInfo()`` outside torchrun).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return ProcessInfo()
    info = ProcessInfo(
        rank=int(os.environ["RANK"]), local_rank=int(os.environ.get("LOCAL_RANK", "0")), world_size=world_size
    )
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return info


def teardown_process(info: ProcessInfo) -> None:
    """Leave the process group this run joined (a no-op for single-process runs)."""
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


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
