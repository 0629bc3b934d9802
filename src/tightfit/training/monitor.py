"""A background sampler of memory: process RSS, system memory, and the training device's memory.

It runs in a daemon thread every ``interval_s`` seconds, keeps the latest sample and the peaks,
and warns once when memory in use passes ``warn_fraction`` of what is there, before the
out-of-memory error does. On CUDA it reads torch's allocator (allocated, reserved, peak) and, when
``nvidia-ml-py`` is installed, the GPU's utilisation; on MPS torch's current and driver memory.
The trainer adds the latest sample to the metrics it logs.
"""

import threading
from collections.abc import Callable

import psutil
import torch

from tightfit._optional import is_available


class ResourceMonitor:
    """Samples memory in the background; use as a context manager around training.

    Args:
        device: the training device.
        interval_s: seconds between samples.
        warn_fraction: warn when used/total of system memory (or of the GPU) passes this.
        warn: called with the warning text (default: print).
    """

    def __init__(
        self,
        device: torch.device,
        interval_s: float = 0.5,
        warn_fraction: float = 0.9,
        warn: Callable[[str], None] = print,
    ):
        self.device = device
        self.interval_s = interval_s
        self.warn_fraction = warn_fraction
        self.warn = warn
        self.process = psutil.Process()
        self.latest: dict[str, float] = {}
        self.peak_rss_bytes = 0
        self.warned: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml_handle = self._open_nvml() if device.type == "cuda" else None

    def _open_nvml(self):
        if not is_available("pynvml"):
            return None
        try:
            import pynvml

            pynvml.nvmlInit()
            return pynvml.nvmlDeviceGetHandleByIndex(self.device.index or 0)
        except Exception:  # NVML missing from the driver: utilisation is optional, memory is not
            return None

    def sample(self) -> dict[str, float]:
        """Take one sample now, update the peaks, warn if memory runs short; returns the sample."""
        rss_bytes = self.process.memory_info().rss
        system = psutil.virtual_memory()
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss_bytes)
        sample = {
            "memory/rss_bytes": float(rss_bytes),
            "memory/peak_rss_bytes": float(self.peak_rss_bytes),
            "memory/system_available_bytes": float(system.available),
        }
        if system.percent / 100 >= self.warn_fraction:
            self._warn_once(
                "system", f"system memory {system.percent:.0f}% used ({system.available / 2**30:.2f} GiB left)"
            )
        if self.device.type == "cuda":
            sample.update(self._cuda_sample())
        elif self.device.type == "mps":
            sample["memory/mps_allocated_bytes"] = float(torch.mps.current_allocated_memory())
            sample["memory/mps_driver_bytes"] = float(torch.mps.driver_allocated_memory())
        self.latest = sample
        return sample

    def _cuda_sample(self) -> dict[str, float]:
        index = self.device.index or 0
        total = torch.cuda.get_device_properties(index).total_memory
        reserved = torch.cuda.memory_reserved(index)
        sample = {
            "memory/cuda_allocated_bytes": float(torch.cuda.memory_allocated(index)),
            "memory/cuda_reserved_bytes": float(reserved),
            "memory/cuda_peak_bytes": float(torch.cuda.max_memory_allocated(index)),
        }
        if reserved / total >= self.warn_fraction:
            self._warn_once(
                "cuda", f"GPU memory {reserved / total:.0%} reserved ({(total - reserved) / 2**30:.2f} GiB left)"
            )
        if self._nvml_handle is not None:
            import pynvml

            sample["gpu/utilization_percent"] = float(pynvml.nvmlDeviceGetUtilizationRates(self._nvml_handle).gpu)
        return sample

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            self.warn(
                f"tightfit train: warning: {message}; out of memory may follow (lower batch.micro_batch_size or set "
                "checkpointing: auto)"
            )

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> "ResourceMonitor":
        self.sample()
        self._thread = threading.Thread(target=self._run, name="tightfit-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
