"""Device profiles: what a device offers a training run, with a source for every figure.

Named profiles (``rtx3050-laptop-6gb``, ``m1-16gb``, ``a100-80gb``, ...) come from
``profiles.yaml`` next to this file. The detected profile describes this machine's best
device with measured memory. Planning, batch-size search and reports all read these.

Example:
    >>> from tightfit.hardware.profiles import resolve_target
    >>> target = resolve_target("rtx3050-laptop-6gb", memory="5GiB")
    >>> target.usable_bytes
    5368709120
"""

import dataclasses
import difflib
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tightfit.errors import SpecError
from tightfit.settings import read_yaml
from tightfit.units import format_bytes, parse_memory

PROFILES_FILE = Path(__file__).with_name("profiles.yaml")
FLOPS_DTYPES = ("fp32", "tf32", "fp16", "bf16")
OVERHEAD_KEYS = ("context_bytes", "workspace_bytes", "fragmentation")
DEVICE_TYPES = ("cuda", "mps", "cpu")


@dataclass(frozen=True)
class DeviceProfile:
    """A device as the memory engine and planner see it.

    Attributes:
        name: ``"rtx3050-laptop-6gb"``, ``"m1-16gb"``, ``"cpu"``, ``"current-cuda:0"``, ...
        description: one line for people.
        device_type: ``"cuda"``, ``"mps"`` or ``"cpu"``.
        memory_bytes: total device memory (unified memory: total system RAM).
        usable_bytes: what a training process can really use (unified memory leaves the OS its
            share); a ``--memory`` budget replaces it.
        unified_memory: whether CPU and accelerator share one memory.
        peak_flops: dense FLOP/s by dtype, keys among ``fp32, tf32, fp16, bf16``; a dtype without
            a fast path is absent (see :meth:`flops_for`).
        memory_bandwidth: bytes/s.
        supports_bf16: bf16 arithmetic runs natively.
        supports_fp16_autocast: fp16 autocast training is supported.
        supports_bitsandbytes: bitsandbytes (8-bit optimizers, 4-bit QLoRA) runs.
        overhead: ``context_bytes``, ``workspace_bytes`` and ``fragmentation`` (a fraction of the
            tensor peak); zeros on CPU.
        sources: figure name (``"peak_flops.fp16"``, ``"usable_bytes"``) -> datasheet URL,
            document, or how it was measured.
        interconnect_bandwidth: bytes/s one device sends to its peers in the same machine
            (NVLink, else PCIe), one direction; what a ring all-gather or reduce-scatter runs at.
            None for devices that do not train in groups (laptops, Macs, the CPU profile).
        host_memory_bytes: the RAM of the machine the device sits in (what CPU stages such as a
            study's SVM and SRC run in); None when the profile does not say (unified memory: the
            device memory is the host's).
    """

    name: str
    description: str
    device_type: str
    memory_bytes: int
    usable_bytes: int
    unified_memory: bool
    peak_flops: dict[str, float]
    memory_bandwidth: float
    supports_bf16: bool
    supports_fp16_autocast: bool
    supports_bitsandbytes: bool
    overhead: dict[str, float]
    sources: dict[str, str] = field(default_factory=dict)
    interconnect_bandwidth: float | None = None
    host_memory_bytes: int | None = None

    def flops_for(self, dtype: str) -> float:
        """Peak dense FLOP/s for ``dtype`` (fp32, tf32, fp16, bf16), falling back to fp32.

        A dtype without its own fast path (bf16 on a T4, TF32 on an M1) runs at the fp32 rate
        or slower, so fp32 is the honest figure to plan with.
        """
        if dtype in self.peak_flops:
            return self.peak_flops[dtype]
        return self.peak_flops.get("fp32", 0.0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return dataclasses.asdict(self)


def list_profiles() -> list[DeviceProfile]:
    """Every named profile in ``profiles.yaml``, in file order."""
    return list(_load_profiles().values())


def get_profile(name: str) -> DeviceProfile:
    """The named profile ``name``.

    Raises:
        SpecError: for an unknown name, suggesting the closest valid names.
    """
    profiles = _load_profiles()
    key = name.strip().lower()
    if key in profiles:
        return profiles[key]
    # Names that contain what was typed ("rtx3050", "a100") come first, then near spellings.
    close = [name for name in profiles if key and key in name]
    close += [name for name in difflib.get_close_matches(key, list(profiles), n=3, cutoff=0.4) if name not in close]
    close = close[:3]
    hint = f"did you mean {', '.join(close)}?" if close else f"valid names: {', '.join(profiles)}"
    raise SpecError(f"unknown device profile {name!r}: {hint} (list them with `tightfit devices`)")


def detect_profile(device_type: str | None = None, index: int | None = None) -> DeviceProfile:
    """A profile of this machine's best device, with measured memory.

    The best device is a CUDA GPU (the one with the most memory), then MPS, then the CPU.
    Throughput figures come from the named profile whose GPU name matches, else are derived
    from the hardware (cores x FLOP/cycle x clock) and say so in ``sources``.

    Args:
        device_type: force ``"cuda"``, ``"mps"`` or ``"cpu"`` instead of the best device.
        index: the CUDA device index (default: the largest GPU).

    Raises:
        SpecError: when the requested device type is not available here.
    """
    from tightfit.hardware import detect

    if device_type not in (None, *DEVICE_TYPES):
        raise SpecError(f"unknown device type {device_type!r} (choose from {', '.join(DEVICE_TYPES)})")
    if device_type in (None, "cuda"):
        cuda = detect.cuda_devices()
        if cuda["devices"]:
            devices = cuda["devices"]
            if index is None:
                chosen = max(devices, key=lambda device: device["total_bytes"])
            elif 0 <= index < len(devices):
                chosen = devices[index]
            else:
                raise SpecError(f"cuda:{index}: this machine has {len(devices)} CUDA device(s)")
            return _cuda_profile(chosen, cuda.get("driver_version"))
        if device_type == "cuda":
            raise SpecError(
                "device 'cuda': no CUDA GPU is available here (name a profile such as "
                "rtx3050-laptop-6gb to plan for one)"
            )
    if device_type in (None, "mps"):
        mps = detect.mps_info()
        if mps["available"]:
            return _mps_profile(mps)
        if device_type == "mps":
            raise SpecError(
                "device 'mps': Apple MPS is not available here (name a profile such as m1-16gb to plan for one)"
            )
    return _cpu_profile()


def resolve_target(device: str | None = None, memory: str | int | None = None) -> DeviceProfile:
    """The device a plan or run is for, with an optional memory budget.

    Args:
        device: a profile name (``"rtx3050-laptop-6gb"``); ``None`` or ``"auto"`` for the
            detected best device; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` for that
            device of this machine (measured, not the generic named profile).
        memory: a budget (``"6GiB"``, ``"512MB"``, or bytes) that replaces ``usable_bytes`` (and
            ``memory_bytes`` when it is smaller).

    Returns:
        The profile, with the budget applied.

    Raises:
        SpecError: for an unknown profile name, an unavailable device, or a bad size.
    """
    budget = parse_memory(memory, where="--memory") if memory is not None else None
    text = (device or "auto").strip().lower()
    cuda_index = re.fullmatch(r"cuda:(\d+)", text)
    if text == "auto":
        profile = detect_profile()
    elif text in DEVICE_TYPES:
        profile = detect_profile(text)
    elif cuda_index:
        profile = detect_profile("cuda", int(cuda_index.group(1)))
    else:
        profile = get_profile(text)
    if budget is None:
        return profile
    return with_budget(profile, budget)


def with_budget(profile: DeviceProfile, budget_bytes: int) -> DeviceProfile:
    """``profile`` with ``usable_bytes`` replaced by ``budget_bytes`` (``memory_bytes`` capped too)."""
    sources = dict(profile.sources, usable_bytes="--memory budget given by the user")
    memory_bytes = profile.memory_bytes
    if budget_bytes < memory_bytes:
        memory_bytes = budget_bytes
        sources["memory_bytes"] = "--memory budget given by the user"
    return dataclasses.replace(
        profile,
        memory_bytes=memory_bytes,
        usable_bytes=budget_bytes,
        description=f"{profile.description}; budget {format_bytes(budget_bytes)}",
        sources=sources,
    )


# ----------------------------------------------------------------------------- loading the file


@functools.cache
def _raw_data(path: Path = PROFILES_FILE) -> dict[str, Any]:
    return read_yaml(path, what="device profiles file")


@functools.cache
def _load_profiles(path: Path = PROFILES_FILE) -> dict[str, DeviceProfile]:
    data = _raw_data(path)
    documents = data.get("documents", {})
    families = data.get("families", {})
    profiles = {}
    for name, entry in data["profiles"].items():
        profiles[name] = _profile_from_entry(name, entry, families, documents, path)
    return profiles


def _profile_from_entry(name: str, entry: dict, families: dict, documents: dict, path: Path) -> DeviceProfile:
    where = f"{path.name}: profiles.{name}"
    family = families.get(entry.get("family"), {}) if entry.get("family") else {}
    if entry.get("family") and not family:
        raise SpecError(f"{where}.family: unknown family {entry['family']!r}")
    supports = {**family.get("supports", {}), **entry.get("supports", {})}
    overhead = {**family.get("overhead", {}), **entry.get("overhead", {})}
    memory_bytes = parse_memory(entry["memory"], where=f"{where}.memory")
    if "usable" in entry:
        usable_bytes = parse_memory(entry["usable"], where=f"{where}.usable")
    else:
        usable_bytes = int(memory_bytes * float(entry["usable_share"]))
    peak_flops = {dtype: float(value) for dtype, value in entry.get("peak_flops", {}).items()}
    unknown = set(peak_flops) - set(FLOPS_DTYPES)
    if unknown:
        raise SpecError(f"{where}.peak_flops: unknown dtype(s) {sorted(unknown)} (use {', '.join(FLOPS_DTYPES)})")
    figures = {
        "memory_bytes": memory_bytes,
        "usable_bytes": usable_bytes,
        **{f"peak_flops.{dtype}": value for dtype, value in peak_flops.items()},
        "memory_bandwidth": float(entry["memory_bandwidth"]),
        "supports_bf16": supports.get("bf16"),
        "supports_fp16_autocast": supports.get("fp16_autocast"),
        "supports_bitsandbytes": supports.get("bitsandbytes"),
        **{f"overhead.{key}": overhead.get(key) for key in OVERHEAD_KEYS},
    }
    if "interconnect_bandwidth" in entry:  # optional, but sourced like every figure when given
        figures["interconnect_bandwidth"] = float(entry["interconnect_bandwidth"])
    if "host_memory" in entry:  # optional, sourced too
        figures["host_memory_bytes"] = parse_memory(entry["host_memory"], where=f"{where}.host_memory")
    missing_values = [figure for figure, value in figures.items() if value is None]
    if missing_values:
        raise SpecError(f"{where}: missing figure(s) {', '.join(missing_values)}")
    declared = {**family.get("sources", {}), **entry.get("sources", {})}
    sources = {}
    for figure in figures:
        source = _source_for(figure, declared)
        if not source:
            raise SpecError(f"{where}: figure {figure} has no source")
        sources[figure] = _expand_document(source, documents)
    return DeviceProfile(
        name=name,
        description=entry["description"],
        device_type=family.get("device_type", entry.get("device_type")),
        memory_bytes=memory_bytes,
        usable_bytes=usable_bytes,
        unified_memory=bool(family.get("unified_memory", entry.get("unified_memory", False))),
        peak_flops=peak_flops,
        memory_bandwidth=float(entry["memory_bandwidth"]),
        supports_bf16=bool(supports["bf16"]),
        supports_fp16_autocast=bool(supports["fp16_autocast"]),
        supports_bitsandbytes=bool(supports["bitsandbytes"]),
        overhead={key: overhead[key] for key in OVERHEAD_KEYS},
        sources=sources,
        interconnect_bandwidth=figures.get("interconnect_bandwidth"),
        host_memory_bytes=figures.get("host_memory_bytes"),
    )


def _source_for(figure: str, declared: dict[str, str]) -> str | None:
    """The most specific declared source: ``peak_flops.fp16``, then ``peak_flops``, ...

    ``supports_bf16`` also matches the group key ``supports``.
    """
    candidates = [figure, figure.split(".")[0]]
    if figure.startswith("supports_"):
        candidates.append("supports")
    for candidate in candidates:
        if declared.get(candidate):
            return str(declared[candidate])
    return None


def _expand_document(source: str, documents: dict[str, str]) -> str:
    """Replace a leading document shorthand (``"a100 (dense figures)"``) with its URL."""
    parts = []
    for piece in source.split("; "):
        head, _, rest = piece.partition(" ")
        if head in documents:
            piece = documents[head] + (f" {rest}" if rest else "")
        parts.append(piece)
    return "; ".join(parts)


# ----------------------------------------------------------------------------- detected devices


def _matching_profile(device_name: str) -> DeviceProfile | None:
    """The named profile whose ``match`` patterns fit a GPU/chip name, if any."""
    for name, entry in _raw_data()["profiles"].items():
        for pattern in entry.get("match", []):
            if re.search(pattern, device_name, re.IGNORECASE):
                return _load_profiles()[name]
    return None


def _cuda_cores_per_sm(major: int, minor: int) -> int:
    """FP32 lanes per streaming multiprocessor, from NVIDIA's architecture whitepapers."""
    if major >= 8 and (major, minor) != (8, 0):
        return 128  # GA10x (8.6, 8.7), Ada (8.9), Hopper (9.0), Blackwell
    if major == 6 and minor != 0:
        return 128  # consumer Pascal (6.1)
    return 64  # P100 (6.0), Volta and Turing (7.x), A100 (8.0)


def _cuda_profile(device: dict[str, Any], driver_version: str | None) -> DeviceProfile:
    total = device["total_bytes"]
    matched = _matching_profile(device["name"])
    if device.get("used_by_others_bytes") is not None:
        # Memory this process already holds (its CUDA context) is not subtracted: the estimator
        # adds the context as overhead, and counting it here too would count it twice.
        usable = total - device["used_by_others_bytes"]
        usable_source = "measured: NVML total minus memory used by processes at detection"
    elif device.get("free_bytes") is not None:
        usable = device["free_bytes"]
        usable_source = "measured: torch.cuda.mem_get_info free bytes at detection"
    else:
        usable = total
        usable_source = "torch.cuda.get_device_properties total_memory (free memory unknown)"
    sources = {"memory_bytes": "measured: torch.cuda.get_device_properties total_memory", "usable_bytes": usable_source}
    if matched is not None:
        peak_flops = dict(matched.peak_flops)
        bandwidth = matched.memory_bandwidth
        overhead = dict(matched.overhead)
        supports_bnb = matched.supports_bitsandbytes
        sources.update(
            {
                key: value
                for key, value in matched.sources.items()
                if key.startswith(("peak_flops", "memory_bandwidth", "overhead", "supports_bitsandbytes"))
            }
        )
        description = f"{device['name']} (this machine; figures of profile {matched.name})"
    else:
        major, minor = (int(part) for part in device["compute_capability"].split("."))
        clock = device.get("max_clock_hz")
        peak_flops = {}
        if clock:
            fp32 = device["multiprocessors"] * _cuda_cores_per_sm(major, minor) * 2 * clock
            peak_flops["fp32"] = fp32
            sources["peak_flops.fp32"] = "derived: SMs x FP32 lanes per SM x 2 FLOP x max SM clock"
        bandwidth = device.get("memory_bandwidth") or 0.0
        sources["memory_bandwidth"] = (
            "derived: 2 x memory clock x bus width (torch device properties)"
            if bandwidth
            else "unknown for this GPU (no matching profile)"
        )
        overhead = dict(_raw_data()["families"]["nvidia"]["overhead"])
        sources.update({f"overhead.{key}": "nvidia family default in profiles.yaml" for key in OVERHEAD_KEYS})
        supports_bnb = major >= 6
        sources["supports_bitsandbytes"] = "bitsandbytes installation docs (compute capability >= 6.0)"
        description = f"{device['name']} (this machine; no matching profile)"
    if driver_version:
        description += f", driver {driver_version}"
    sources["supports_bf16"] = "torch: compute capability >= 8.0"
    sources["supports_fp16_autocast"] = "torch.autocast supports fp16 on CUDA"
    return DeviceProfile(
        name=f"current-cuda:{device['index']}",
        description=description,
        device_type="cuda",
        memory_bytes=total,
        usable_bytes=max(0, int(usable)),
        unified_memory=False,
        peak_flops=peak_flops,
        memory_bandwidth=bandwidth,
        supports_bf16=bool(device["bf16"]),
        supports_fp16_autocast=True,
        supports_bitsandbytes=bool(supports_bnb),
        overhead=overhead,
        sources=sources,
    )


def _mps_profile(mps: dict[str, Any]) -> DeviceProfile:
    from tightfit.hardware import detect

    memory = detect.memory_info()
    chip = detect.chip_name() or "Apple silicon"
    matched = _matching_profile(chip)
    recommended = mps.get("recommended_max_bytes")
    usable = min(recommended, memory["total_bytes"]) if recommended else int(memory["total_bytes"] * 2 / 3)
    sources = {
        "memory_bytes": "measured: psutil total system memory (unified)",
        "usable_bytes": (
            "measured: torch.mps.recommended_max_memory() (Metal recommendedMaxWorkingSetSize)"
            if recommended
            else "2/3 of system memory (Metal's usual working-set share)"
        ),
    }
    base = matched or get_profile("m1-16gb")
    sources.update(
        {
            key: value
            for key, value in base.sources.items()
            if key.startswith(("peak_flops", "memory_bandwidth", "overhead", "supports_"))
        }
    )
    note = f"figures of profile {base.name}" if matched else f"throughput unknown for this chip; figures of {base.name}"
    return dataclasses.replace(
        base,
        name="current-mps",
        description=f"{chip}, {format_bytes(memory['total_bytes'])} unified memory (this machine; {note})",
        memory_bytes=memory["total_bytes"],
        usable_bytes=int(usable),
        sources=sources,
    )


def _cpu_profile() -> DeviceProfile:
    from tightfit.hardware import detect

    cpu = detect.cpu_info()
    memory = detect.memory_info()
    generic = get_profile("cpu")
    sources = dict(generic.sources)
    sources.update(
        {
            "memory_bytes": "measured: psutil total system memory",
            "usable_bytes": "measured: psutil available memory at detection",
        }
    )
    peak_flops = dict(generic.peak_flops)
    cores = cpu["physical_cores"] or cpu["logical_cores"]
    if cores and cpu["max_frequency_hz"]:
        peak_flops = {"fp32": cores * cpu["fp32_flop_per_cycle_per_core"] * cpu["max_frequency_hz"]}
        sources["peak_flops.fp32"] = (
            f"derived: {cores} cores x {cpu['fp32_flop_per_cycle_per_core']} FLOP/cycle "
            f"({'/'.join(cpu['vector_extensions']) or 'scalar'}) x {cpu['max_frequency_hz'] / 1e9:.2f} GHz"
        )
    elif cores:
        # No clock reported (common in VMs): scale the generic 8-core figure by the core count.
        peak_flops = {"fp32": generic.peak_flops["fp32"] * cores / 8}
        sources["peak_flops.fp32"] = f"derived: generic cpu profile scaled to {cores} cores (no clock reported)"
    native_bf16 = any(flag in cpu["vector_extensions"] for flag in ("avx512_bf16", "amx_bf16"))
    sources["supports_bf16"] = "detected: CPU flags " + ("include" if native_bf16 else "lack") + " avx512_bf16/amx_bf16"
    return dataclasses.replace(
        generic,
        name="current-cpu",
        supports_bf16=native_bf16,
        description=f"{cpu['model']}, {cores} cores, {format_bytes(memory['total_bytes'])} RAM (this machine)",
        memory_bytes=memory["total_bytes"],
        usable_bytes=memory["available_bytes"],
        peak_flops=peak_flops,
        sources=sources,
    )
