"""Latency measurement that a compression decision can rest on.

Every figure comes from repeated runs after a warm-up, with the thread count fixed and stated:
the median says how fast the model usually is, the 90th percentile how slow it gets. A compressed
model is only called faster when its median latency is lower than the original's, measured the
same way, in the same process, with the same threads.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_WARMUP = 10
DEFAULT_REPEATS = 50


@dataclass
class Latency:
    """Latency of one forward pass at one batch size.

    Attributes:
        batch_size: samples per call.
        median_ms: median wall time of one call, in milliseconds.
        p90_ms: 90th percentile of the same runs.
        throughput: samples per second at the median (``batch_size / median``).
        threads: intra-op threads the runtime was allowed.
        repeats: timed calls (after ``warmup`` untimed ones).
        warmup: untimed calls made first (lazy initialisation, caches, allocator).
    """

    batch_size: int
    median_ms: float
    p90_ms: float
    throughput: float
    threads: int
    repeats: int
    warmup: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_threads() -> int:
    """The thread count used when none is given: torch's own default (physical cores)."""
    import torch

    return torch.get_num_threads()


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)``, restoring the previous value."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def time_calls(
    call: Callable[[], Any],
    *,
    batch_size: int,
    threads: int,
    warmup: int = DEFAULT_WARMUP,
    repeats: int = DEFAULT_REPEATS,
    min_seconds: float = 0.0,
) -> Latency:
    """Time ``call()`` after a warm-up and summarise the runs.

    Args:
        call: runs one forward pass on a prepared batch (the caller fixes threads and inputs).
        batch_size: samples per call, for the throughput.
        threads: the thread count in force, recorded in the result.
        warmup: untimed calls first.
        repeats: timed calls (at least this many).
        min_seconds: keep timing until this much time has passed too, so very fast models get
            enough samples for a stable median.

    Returns:
        The :class:`Latency` of the runs.
    """
    for _ in range(warmup):
        call()
    durations = []
    started = time.perf_counter()
    while len(durations) < repeats or time.perf_counter() - started < min_seconds:
        begin = time.perf_counter()
        call()
        durations.append(time.perf_counter() - begin)
    median = statistics.median(durations)
    p90 = statistics.quantiles(durations, n=10)[-1] if len(durations) > 1 else median
    return Latency(
        batch_size=batch_size,
        median_ms=median * 1e3,
        p90_ms=p90 * 1e3,
        throughput=batch_size / median if median > 0 else float("inf"),
        threads=threads,
        repeats=len(durations),
        warmup=warmup,
    )


def measure_torch_latency(
    model: Any,
    example_batch: Any,
    *,
    threads: int | None = None,
    warmup: int = DEFAULT_WARMUP,
    repeats: int = DEFAULT_REPEATS,
    min_seconds: float = 0.0,
) -> Latency:
    """Latency of a PyTorch model (eager, compiled or quantized) on CPU under inference mode.

    Args:
        model: a callable module; it is put in eval mode.
        example_batch: the inputs, in a form :func:`tightfit.step.loss.split_batch` accepts;
            its batch size is read from the first tensor.
        threads: intra-op threads (default: :func:`default_threads`).
        warmup, repeats, min_seconds: see :func:`time_calls`.

    Returns:
        The :class:`Latency`.
    """
    import torch

    from tightfit.step.loss import split_batch

    threads = threads or default_threads()
    args, kwargs, _ = split_batch(example_batch)
    batch_size = _batch_size_of(args, kwargs)
    if hasattr(model, "eval"):
        model.eval()
    with torch_threads(threads), torch.inference_mode():
        return time_calls(
            lambda: model(*args, **kwargs),
            batch_size=batch_size,
            threads=threads,
            warmup=warmup,
            repeats=repeats,
            min_seconds=min_seconds,
        )


# ONNX Runtime's execution providers, best first: what `predict` takes when the machine has it.
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CoreMLExecutionProvider", "CPUExecutionProvider")


def ort_session(path: str | os.PathLike, *, threads: int | None = None, best_device: bool = False):
    """An ONNX Runtime session with ``threads`` intra-op threads and full graph optimisation: on
    the CPU (what the latency figures measure), or with ``best_device`` on the best provider this
    machine's onnxruntime has (CUDA, then CoreML, then CPU)."""
    from tightfit._optional import require

    ort = require("onnxruntime", extra="onnx", purpose="running ONNX models")
    available = set(ort.get_available_providers())
    providers = [name for name in PREFERRED_PROVIDERS if name in available] if best_device else ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def measure_onnx_latency(
    path: str | os.PathLike,
    feeds: dict[str, Any],
    *,
    threads: int | None = None,
    warmup: int = DEFAULT_WARMUP,
    repeats: int = DEFAULT_REPEATS,
    min_seconds: float = 0.0,
) -> Latency:
    """Latency of an ONNX model under ONNX Runtime (CPU) for the given numpy ``feeds``."""
    threads = threads or default_threads()
    session = ort_session(path, threads=threads)
    batch_size = int(next(iter(feeds.values())).shape[0])
    return time_calls(
        lambda: session.run(None, feeds),
        batch_size=batch_size,
        threads=threads,
        warmup=warmup,
        repeats=repeats,
        min_seconds=min_seconds,
    )


def _batch_size_of(args: tuple, kwargs: dict) -> int:
    import torch

    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    return 1


def cpu_int8_support(cpuinfo: str = "/proc/cpuinfo") -> dict[str, Any]:
    """Whether this CPU has fast int8 dot products, read from ``/proc/cpuinfo`` flags.

    Int8 kernels only beat fp32 clearly with VNNI (x86: ``avx512_vnni`` or ``avx_vnni``) or the
    ARM dot-product extension (``asimddp``); without them quantized models may well be slower.

    Args:
        cpuinfo: the file to read (``/proc/cpuinfo`` on Linux; absent on macOS, where Apple
            silicon always has the dot-product extension).

    Returns:
        ``{"machine", "flags" (the relevant ones found), "fast_int8" (bool or None when unknown),
        "warning" (a sentence, or None)}``.
    """
    machine = platform.machine().lower()
    wanted = {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "avx2", "avx512f"}
    found: set[str] = set()
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if line.lower().startswith(("flags", "features")):
                    found |= wanted & set(line.split(":", 1)[-1].split())
    except OSError:
        if machine == "arm64" and platform.system() == "Darwin":
            return {"machine": machine, "flags": [], "fast_int8": True, "warning": None}
        return {"machine": machine, "flags": [], "fast_int8": None, "warning": None}
    fast = bool(found & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"})
    warning = None
    if not fast:
        warning = (
            "this CPU has no VNNI (x86) or dot-product (ARM) int8 instructions; "
            "int8 models may not run faster than fp32 here"
        )
    return {"machine": machine, "flags": sorted(found), "fast_int8": fast, "warning": warning}


def machine_load() -> dict[str, Any]:
    """The 1-minute load average against the core count: timings on a busy machine are noisy.

    Returns:
        ``{"load_1min", "cores", "busy", "warning"}``; ``busy`` when other work keeps more
        processes runnable than there are cores, so a timed run is often descheduled.
    """
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # not available on every platform
        return {"load_1min": None, "cores": cores, "busy": False, "warning": None}
    busy = load > cores
    warning = (
        (
            f"the machine is busy (load {load:.1f} on {cores} cores): latency figures will be noisy; "
            "measure on a quiet machine before trusting small differences"
        )
        if busy
        else None
    )
    return {"load_1min": round(load, 2), "cores": cores, "busy": busy, "warning": warning}
