"""What a device adds on top of live tensor bytes: context, allocator rounding, fragmentation, workspaces.

The tracker counts tensor storages; a GPU process needs more than that:

* **CUDA context** (``overhead.context_bytes``): the driver's per-process state and the loaded
  kernel modules. It is outside PyTorch's allocator (``max_memory_reserved`` does not show it) but
  it is taken from the same device memory.
* **Allocator rounding**: PyTorch's CUDA caching allocator rounds every block up to a multiple of
  512 bytes (``kMinBlockSize`` in ``c10/cuda/CUDACachingAllocator.cpp``), so
  ``max_memory_allocated`` is the peak of the rounded sizes. The tracker counts the rounded sizes
  beside the exact ones (:func:`allocation_size`), so this part is exact, not a guess.
* **Fragmentation** (``overhead.fragmentation``, a fraction of the allocated peak): the caching
  allocator reserves whole segments (2 MiB for blocks up to 1 MiB, 20 MiB for blocks up to 10 MiB,
  then rounded to 2 MiB) and keeps freed blocks cached, so ``max_memory_reserved`` exceeds
  ``max_memory_allocated``. How much depends on the allocation pattern; the profile's fraction is a
  calibrated average (``benchmarks/memory_accuracy.py --cuda`` measures it).
* **Library workspaces** (``overhead.workspace_bytes``): cuBLAS keeps a workspace per handle
  and stream (``CUBLAS_WORKSPACE_CONFIG``, by default 4 MiB x 8 before Hopper, 32 MiB on Hopper),
  cuDNN convolution algorithms ask for scratch space.

On Apple MPS the same three profile figures apply (the MPS allocator caches heaps the same way);
on CPU the overhead is zero: the system allocator gives back what tensors free.

The figures come from the device profile (``tightfit.hardware.profiles``), with their sources in
``profiles.yaml``.
"""

from collections.abc import Callable
from dataclasses import dataclass

CUDA_BLOCK_BYTES = 512  # kMinBlockSize: every CUDA caching-allocator block is a multiple of this


@dataclass(frozen=True)
class DeviceOverhead:
    """The device overhead of one step, by component (bytes)."""

    context_bytes: int = 0
    workspace_bytes: int = 0
    rounding_bytes: int = 0
    fragmentation_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.context_bytes + self.workspace_bytes + self.rounding_bytes + self.fragmentation_bytes

    def describe(self) -> str:
        """One line for the notes of a :class:`~tightfit.memory.report.StepMemory`."""
        from tightfit.units import format_bytes

        return (
            f"device overhead {format_bytes(self.total_bytes)}: context {format_bytes(self.context_bytes)}, "
            f"workspaces {format_bytes(self.workspace_bytes)}, allocator rounding {format_bytes(self.rounding_bytes)}, "
            f"fragmentation {format_bytes(self.fragmentation_bytes)}"
        )


def allocation_size(device_type: str) -> Callable[[int], int] | None:
    """What the device's allocator reserves for a storage of ``n`` bytes; None where it is ``n``.

    Args:
        device_type: ``"cuda"``, ``"mps"`` or ``"cpu"``.

    Returns:
        For CUDA, ``n`` rounded up to a multiple of 512 bytes (at least 512); None otherwise
        (MPS rounding is folded into the fragmentation fraction, the CPU allocator is exact).
    """
    if device_type != "cuda":
        return None

    def rounded(nbytes: int) -> int:
        return max(CUDA_BLOCK_BYTES, -(-nbytes // CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES)

    return rounded


def device_overhead(profile, *, tensor_peak_bytes: int, allocated_peak_bytes: int | None = None) -> DeviceOverhead:
    """The overhead a device adds to a step whose live tensors peak at ``tensor_peak_bytes``.

    Args:
        profile: a ``DeviceProfile`` (``device_type`` and ``overhead`` are read), or None for CPU.
        tensor_peak_bytes: the tracker's peak of exact storage sizes.
        allocated_peak_bytes: the tracker's peak of :func:`allocation_size` sizes (the prediction of
            ``torch.cuda.max_memory_allocated``); ``tensor_peak_bytes`` when not given.

    Returns:
        The components; all zero for CPU targets.
    """
    if profile is None or profile.device_type == "cpu":
        return DeviceOverhead()
    figures = dict(getattr(profile, "overhead", {}) or {})
    allocated = max(tensor_peak_bytes, allocated_peak_bytes or tensor_peak_bytes)
    return DeviceOverhead(
        context_bytes=int(figures.get("context_bytes", 0)),
        workspace_bytes=int(figures.get("workspace_bytes", 0)),
        rounding_bytes=allocated - tensor_peak_bytes,
        fragmentation_bytes=int(round(float(figures.get("fragmentation", 0.0)) * allocated)),
    )
