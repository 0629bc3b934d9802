"""Recognise an out-of-memory error from any device, whatever wraps it.

PyTorch raises ``torch.OutOfMemoryError`` for CUDA (and for the tracker's simulated budget), but
MPS raises a plain ``RuntimeError`` ("MPS backend out of memory", accelerate #4226) and the CPU
allocator raises ``RuntimeError`` ("DefaultCPUAllocator: can't allocate memory") or, on Windows,
"not enough memory". Anchors that only check the CUDA message (Lightning's ``is_oom_error``) miss
the other two; this module checks them all.
"""

_OOM_MESSAGES = (
    "cuda out of memory",
    "mps backend out of memory",
    "defaultcpuallocator: can't allocate memory",
    "not enough memory",
    "cudnn_status_alloc_failed",
    "cublas_status_alloc_failed",
    "hip out of memory",
    "xpu out of memory",
)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) means a device ran out of memory.

    Args:
        error: any exception, e.g. the one caught around a training step.

    Returns:
        True for ``torch.OutOfMemoryError`` (CUDA and the tracker's simulated budget), Python's
        ``MemoryError``, and ``RuntimeError``s whose message is a CUDA, MPS, CPU, cuDNN or cuBLAS
        allocation failure; also when such an error is the ``__cause__``/``__context__`` of
        ``error`` (a library that re-raises). False otherwise.
    """
    import torch

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (torch.OutOfMemoryError, MemoryError)):
            return True
        if isinstance(current, RuntimeError):
            message = str(current).lower()
            if any(text in message for text in _OOM_MESSAGES):
                return True
        current = current.__cause__ or current.__context__
    return False
