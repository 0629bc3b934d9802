"""Facts about this machine: CPU, system memory, disk, CUDA GPUs (torch and NVML), MPS.

Each function returns plain JSON-ready dicts so that ``tightfit doctor --json`` and the device
profiles read the same facts. Detection never raises: a probe that fails records its error
under ``"error"`` and the rest of the report goes on.
"""

import os
import platform
import re
import shutil
import sys
from pathlib import Path
from typing import Any


def resolve_device(device: Any = None, *, local_rank: int | None = None):
    """The ``torch.device`` a setting names, the one resolution the trainer, the planners and the
    commands share.

    Args:
        device: ``None`` or ``"auto"`` (CUDA if present, else MPS, else CPU), ``"cpu"``, ``"cuda"``,
            ``"cuda:N"``, ``"mps"`` or a ``torch.device``.
        local_rank: under torchrun, this process's local rank: a plain ``cuda`` becomes ``cuda:RANK``.

    Raises:
        ConfigError: a device this machine does not have, or a name torch does not know.
    """
    import torch

    from tightfit.errors import ConfigError

    name = "auto" if device is None else str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name} was asked for but torch sees no CUDA device (try device=auto)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device: mps was asked for but this torch build or machine has no MPS")
    if name == "cuda" and local_rank is not None:
        name = f"cuda:{local_rank}"
    try:
        return torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"device: cannot use {device!r} ({error})") from None


def cpu_info() -> dict[str, Any]:
    """The CPU: model name, physical/logical cores, max clock, vector extensions.

    Returns:
        ``{"model", "architecture", "physical_cores", "logical_cores", "max_frequency_hz",
        "vector_extensions", "fp32_flop_per_cycle_per_core"}``; the last is the peak of one core's
        fused multiply-add units, used to derive the CPU's peak FLOP/s.
    """
    import psutil

    flags = _cpu_flags()
    frequency = None
    try:
        freq = psutil.cpu_freq()
        if freq is not None:
            frequency = (freq.max or freq.current or 0.0) * 1e6 or None
    except (OSError, NotImplementedError, RuntimeError):
        frequency = None
    if frequency is None and platform.system() == "Darwin":
        frequency = _sysctl_int("hw.cpufrequency_max")
    extensions = [
        name for name in ("avx512f", "avx512_bf16", "amx_bf16", "avx2", "fma", "asimd", "neon") if name in flags
    ]
    if platform.machine().lower() in ("arm64", "aarch64") and "neon" not in extensions:
        extensions.append("neon")  # every 64-bit Arm core has Advanced SIMD
    return {
        "model": _cpu_model(),
        "architecture": platform.machine(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "max_frequency_hz": frequency,
        "vector_extensions": extensions,
        "fp32_flop_per_cycle_per_core": _fp32_flop_per_cycle(extensions, _cpu_model()),
        "load_average_1min": _load_average(),
    }


def _load_average() -> float | None:
    import psutil

    try:
        return float(psutil.getloadavg()[0])
    except (OSError, AttributeError):
        return None


def _fp32_flop_per_cycle(extensions: list[str], model: str) -> int:
    # Two FMA pipes per core on current x86 cores: lanes x 2 FLOP x 2 pipes. AMD Zen 4 runs
    # AVX-512 as two 256-bit halves, so it peaks at the AVX2 rate.
    if "avx512f" in extensions and "AMD" not in model.upper():
        return 64
    if "avx2" in extensions and "fma" in extensions:
        return 32
    if "neon" in extensions or "asimd" in extensions:
        return 16  # 2-4 x 128-bit FMA pipes; 16 is the conservative count
    return 8  # SSE: 4 lanes x 2 FLOP


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    match = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.MULTILINE)
    return set(match.group(1).split()) if match else set()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith(("model name", "Hardware", "Model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        brand = _sysctl_str("machdep.cpu.brand_string")
        if brand:
            return brand
    return platform.processor() or platform.machine() or "unknown"


def _sysctl_str(key: str) -> str | None:
    import subprocess

    try:
        result = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def _sysctl_int(key: str) -> int | None:
    value = _sysctl_str(key)
    return int(value) if value and value.isdigit() else None


def memory_info() -> dict[str, Any]:
    """System memory and swap in bytes, from psutil."""
    import psutil

    virtual = psutil.virtual_memory()
    swap = psutil.swap_memory()
    return {
        "total_bytes": int(virtual.total),
        "available_bytes": int(virtual.available),
        "used_percent": float(virtual.percent),
        "swap_total_bytes": int(swap.total),
        "swap_used_bytes": int(swap.used),
    }


def disk_info(path: str | os.PathLike) -> dict[str, Any]:
    """Free space on the file system that holds ``path`` (its nearest existing parent)."""
    probe = Path(path).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    return {
        "path": str(Path(path).expanduser().absolute()),
        "checked": str(probe),
        "total_bytes": int(usage.total),
        "free_bytes": int(usage.free),
    }


def system_info() -> dict[str, Any]:
    """Python and OS facts."""
    return {
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "executable": sys.executable,
        "os": platform.system(),
        "os_release": platform.release(),
        "os_version": platform.mac_ver()[0] if platform.system() == "Darwin" else platform.version(),
        "architecture": platform.machine(),
    }


def torch_info() -> dict[str, Any]:
    """The installed torch and how it was built (imports torch)."""
    import torch

    return {
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,
        "hip_build": getattr(torch.version, "hip", None),
        "cudnn_version": _cudnn_version(torch),
        "mps_built": bool(torch.backends.mps.is_built()),
        "debug_build": bool(torch.version.debug),
    }


def _cudnn_version(torch) -> str | None:
    if not torch.backends.cudnn.is_available():
        return None
    number = torch.backends.cudnn.version()
    if not number:
        return None
    # cuDNN >= 9 encodes major*10000 + minor*100 + patch; older releases major*1000 + minor*100 + patch.
    major, rest = divmod(number, 10000) if number >= 90000 else divmod(number, 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def cuda_devices() -> dict[str, Any]:
    """CUDA availability and every visible GPU, from torch and, where present, NVML.

    Returns:
        ``{"available", "device_count", "driver_version", "nvml", "devices": [...]}``; each
        device has ``index, name, total_bytes, free_bytes, used_by_others_bytes,
        compute_capability, multiprocessors, bf16, tf32, max_clock_hz, memory_bandwidth``
        (bandwidth in bytes/s from the memory clock and bus width; ``free_bytes`` and
        ``used_by_others_bytes`` from NVML when available, which needs no CUDA context; else
        ``free_bytes`` from ``torch.cuda.mem_get_info`` and ``used_by_others_bytes`` None).
    """
    import torch

    report: dict[str, Any] = {
        "available": bool(torch.cuda.is_available()),
        "device_count": 0,
        "driver_version": None,
        "nvml": False,
        "devices": [],
    }
    if not report["available"]:
        return report
    nvml = _nvml_devices()
    report["nvml"] = nvml is not None
    if nvml:
        report["driver_version"] = nvml[0].get("driver_version")
    report["device_count"] = torch.cuda.device_count()
    for index in range(report["device_count"]):
        properties = torch.cuda.get_device_properties(index)
        major, minor = properties.major, properties.minor
        device = {
            "index": index,
            "name": properties.name,
            "total_bytes": int(properties.total_memory),
            "free_bytes": None,
            "used_by_others_bytes": None,
            "compute_capability": f"{major}.{minor}",
            "multiprocessors": int(properties.multi_processor_count),
            # bf16 and TF32 tensor cores arrive with Ampere (8.0).
            "bf16": major >= 8,
            "tf32": major >= 8,
            "max_clock_hz": _khz_to_hz(getattr(properties, "clock_rate", None)),
            # deviceQuery's formula: 2 transfers per memory clock x bus width in bytes.
            "memory_bandwidth": (
                2 * _khz_to_hz(properties.memory_clock_rate) * properties.memory_bus_width / 8
                if getattr(properties, "memory_clock_rate", None) and getattr(properties, "memory_bus_width", None)
                else None
            ),
        }
        if nvml and index < len(nvml):
            info = nvml[index]
            device["free_bytes"] = info["free_bytes"]
            device["used_by_others_bytes"] = info["used_bytes"]
            device["max_clock_hz"] = info.get("max_clock_hz") or device["max_clock_hz"]
        else:
            try:
                free, _total = torch.cuda.mem_get_info(index)
                device["free_bytes"] = int(free)
            except RuntimeError as error:
                device["error"] = f"mem_get_info failed: {error}"
        report["devices"].append(device)
    return report


def _khz_to_hz(value: float | None) -> float | None:
    return float(value) * 1e3 if value else None


def _nvml_devices() -> list[dict[str, Any]] | None:
    """Memory and clocks per GPU from NVML (nvidia-ml-py), or None without it.

    NVML order follows PCI bus order, which is torch's order only when CUDA_DEVICE_ORDER is
    PCI_BUS_ID or CUDA_VISIBLE_DEVICES is unset on single-GPU machines; we use it only then.
    """
    if os.environ.get("CUDA_VISIBLE_DEVICES") and os.environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        return None
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - NVMLError subclasses vary by driver; absence is not an error
        return None
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
        devices = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            own_bytes = _own_process_bytes(pynvml, handle)
            try:
                clock = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM) * 1e6
            except Exception:  # noqa: BLE001 - not supported on every board
                clock = None
            devices.append(
                {
                    "driver_version": driver,
                    "free_bytes": int(memory.free),
                    "used_bytes": int(memory.used) - own_bytes,
                    "total_bytes": int(memory.total),
                    "max_clock_hz": clock,
                }
            )
        return devices
    except Exception:  # noqa: BLE001
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def _own_process_bytes(pynvml, handle) -> int:
    """GPU memory NVML attributes to this process (its CUDA context and caches), 0 if unknown.

    Subtracted from NVML's "used" so that memory this process already holds is not counted as
    taken by others (in containers the PIDs may not match; then nothing is subtracted).
    """
    try:
        processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except Exception:  # noqa: BLE001 - not supported on every driver
        return 0
    return sum(int(process.usedGpuMemory or 0) for process in processes if process.pid == os.getpid())


def mps_info() -> dict[str, Any]:
    """Apple MPS: built, available, Metal's recommended working-set size, the MPS settings in use."""
    import torch

    built = bool(torch.backends.mps.is_built())
    available = bool(torch.backends.mps.is_available())
    report: dict[str, Any] = {
        "built": built,
        "available": available,
        "recommended_max_bytes": None,
        # Settings that change MPS behaviour, reported so the advice can take them into account.
        "fallback_enabled": os.environ.get("PYTORCH_ENABLE_MPS_FALLBACK") == "1",
        "high_watermark_ratio": os.environ.get("PYTORCH_MPS_HIGH_WATERMARK_RATIO"),
    }
    if available:
        try:
            report["recommended_max_bytes"] = int(torch.mps.recommended_max_memory())
        except (AttributeError, RuntimeError) as error:
            report["error"] = f"recommended_max_memory failed: {error}"
    return report


def chip_name() -> str | None:
    """The Apple chip name ("Apple M1", "Apple M2 Max") on macOS, else None."""
    if platform.system() != "Darwin":
        return None
    return _sysctl_str("machdep.cpu.brand_string")
