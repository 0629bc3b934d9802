"""Device profiles: the data file loads, every figure has a source, budgets parse, names resolve."""

import dataclasses

import psutil
import pytest
import torch

from tightfit.errors import SpecError
from tightfit.hardware import profiles
from tightfit.hardware.profiles import (
    DeviceProfile,
    detect_profile,
    get_profile,
    list_profiles,
    resolve_target,
)

REQUIRED = {
    "rtx3050-laptop-6gb",
    "m1-16gb",
    "m2-max-32gb",
    "t4-16gb",
    "rtx3060-12gb",
    "rtx4090-24gb",
    "a100-40gb",
    "a100-80gb",
    "h100-80gb",
    "v100-16gb",
    "cpu",
}
GIB = 2**30


def test_every_required_profile_is_present():
    names = {profile.name for profile in list_profiles()}
    assert REQUIRED <= names


@pytest.mark.parametrize("profile", list_profiles(), ids=lambda profile: profile.name)
def test_every_figure_has_a_source(profile: DeviceProfile):
    figures = [
        "memory_bytes",
        "usable_bytes",
        "memory_bandwidth",
        "supports_bf16",
        "supports_fp16_autocast",
        "supports_bitsandbytes",
    ]
    figures += [f"peak_flops.{dtype}" for dtype in profile.peak_flops]
    figures += [f"overhead.{key}" for key in ("context_bytes", "workspace_bytes", "fragmentation")]
    for figure in figures:
        assert profile.sources.get(figure, "").strip(), f"{profile.name}: {figure} has no source"
    # Shorthands are expanded: no source still starts with a bare document key.
    documents = profiles._raw_data()["documents"]
    for figure, source in profile.sources.items():
        assert source.split(" ")[0] not in documents, f"{profile.name}: {figure} source not expanded"


@pytest.mark.parametrize("profile", list_profiles(), ids=lambda profile: profile.name)
def test_figures_are_plausible(profile: DeviceProfile):
    assert profile.device_type in ("cuda", "mps", "cpu")
    assert 0 < profile.usable_bytes <= profile.memory_bytes
    assert set(profile.peak_flops) <= {"fp32", "tf32", "fp16", "bf16"}
    assert profile.peak_flops["fp32"] > 1e11
    # Tensor-core dtypes are never slower than fp32 on these devices.
    for dtype, flops in profile.peak_flops.items():
        assert flops >= profile.peak_flops["fp32"], (profile.name, dtype)
    assert profile.memory_bandwidth > 1e10
    assert set(profile.overhead) == {"context_bytes", "workspace_bytes", "fragmentation"}
    assert 0 <= profile.overhead["fragmentation"] < 1
    if profile.device_type == "cpu":
        assert profile.overhead == {"context_bytes": 0, "workspace_bytes": 0, "fragmentation": 0.0}
    if profile.supports_bf16 and profile.device_type == "cuda":
        assert "bf16" in profile.peak_flops


def test_known_datasheet_figures():
    rtx3050 = get_profile("rtx3050-laptop-6gb")
    assert rtx3050.memory_bytes == 6 * GIB  # 6144 MiB, as nvidia-smi reports in seed-002
    assert rtx3050.supports_bf16 and rtx3050.device_type == "cuda" and not rtx3050.unified_memory
    m1 = get_profile("m1-16gb")
    assert m1.unified_memory and m1.memory_bytes == 16 * GIB
    assert 10 * GIB <= m1.usable_bytes <= 12 * GIB  # seed-000: 10-12 GB usable of 16
    assert not get_profile("t4-16gb").supports_bf16
    assert get_profile("t4-16gb").usable_bytes == 15 * GIB  # ECC keeps 1/16
    assert get_profile("a100-80gb").peak_flops["bf16"] == pytest.approx(312e12)
    assert get_profile("h100-80gb").peak_flops["bf16"] == pytest.approx(1979e12 / 2, rel=1e-3)


def test_flops_for_falls_back_to_fp32():
    t4 = get_profile("t4-16gb")
    assert t4.flops_for("bf16") == t4.peak_flops["fp32"]
    assert t4.flops_for("fp16") == 65e12


def test_profiles_are_frozen_and_serializable():
    profile = get_profile("cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        profile.memory_bytes = 1  # type: ignore[misc]
    data = profile.to_dict()
    assert data["name"] == "cpu" and data["sources"]["memory_bytes"]


@pytest.mark.parametrize(
    ("typo", "expected"),
    [
        ("rtx3050", "rtx3050-laptop-6gb"),
        ("a100", "a100-40gb"),
        ("m1-16", "m1-16gb"),
        ("h100", "h100-80gb"),
        ("t4", "t4-16gb"),
    ],
)
def test_unknown_name_suggests_the_closest(typo: str, expected: str):
    with pytest.raises(SpecError, match=expected) as error:
        get_profile(typo)
    assert repr(typo) in str(error.value)


def test_unknown_name_without_close_match_lists_valid_names():
    with pytest.raises(SpecError, match="valid names: .*rtx3050-laptop-6gb"):
        get_profile("zzzzzz")


def test_names_are_case_insensitive():
    assert get_profile("RTX3050-Laptop-6GB").name == "rtx3050-laptop-6gb"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("6GiB", 6 * GIB),
        ("6 GiB", 6 * GIB),
        ("6GB", 6 * 10**9),
        ("512MiB", 512 * 2**20),
        ("512MB", 512 * 10**6),
        ("1.5g", int(1.5 * GIB)),
        (5 * GIB, 5 * GIB),
    ],
)
def test_resolve_target_budget(text, expected):
    target = resolve_target("rtx3050-laptop-6gb", memory=text)
    assert target.usable_bytes == expected
    assert target.memory_bytes == min(expected, 6 * GIB)
    assert target.sources["usable_bytes"].startswith("--memory")
    assert target.name == "rtx3050-laptop-6gb"
    # The named profile itself is untouched.
    assert get_profile("rtx3050-laptop-6gb").usable_bytes != expected


def test_budget_larger_than_the_device_keeps_its_total():
    target = resolve_target("rtx3050-laptop-6gb", memory="8GiB")
    assert target.usable_bytes == 8 * GIB and target.memory_bytes == 6 * GIB


@pytest.mark.parametrize("bad", ["six gigs", "6XB", "-1GB", "0", "", "GiB", "6 G i B"])
def test_resolve_target_bad_budget(bad):
    with pytest.raises(SpecError, match="--memory"):
        resolve_target("cpu", memory=bad)


def test_resolve_target_bad_device():
    with pytest.raises(SpecError, match="did you mean"):
        resolve_target("rtx-3050")


def test_detected_cpu_matches_psutil():
    profile = resolve_target("cpu")
    assert profile.name == "current-cpu" and profile.device_type == "cpu"
    assert profile.memory_bytes == psutil.virtual_memory().total
    assert 0 < profile.usable_bytes <= profile.memory_bytes
    assert profile.peak_flops["fp32"] > 0
    assert profile.sources["peak_flops.fp32"].startswith("derived")


def test_auto_is_the_best_device():
    profile = resolve_target("auto", memory="1GiB")
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert profile.device_type == expected
    assert profile.usable_bytes == GIB
    assert detect_profile().device_type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_requested_without_cuda_is_a_clear_error():
    with pytest.raises(SpecError, match="no CUDA GPU"):
        resolve_target("cuda")
    with pytest.raises(SpecError, match="no CUDA GPU"):
        resolve_target("cuda:0")


@pytest.mark.gpu
@pytest.mark.gpu
def test_detected_cuda_profile_matches_torch():
    profile = resolve_target("cuda")
    properties = torch.cuda.get_device_properties(0)
    assert profile.name.startswith("current-cuda:")
    assert profile.memory_bytes == properties.total_memory
    assert 0 < profile.usable_bytes <= profile.memory_bytes
    assert profile.supports_bf16 == (properties.major >= 8)


def test_unmatched_gpu_gets_derived_figures(monkeypatch):
    device = {
        "index": 0,
        "name": "NVIDIA Imaginary X1",
        "total_bytes": 8 * GIB,
        "free_bytes": 7 * GIB,
        "used_by_others_bytes": GIB // 2,
        "compute_capability": "8.6",
        "multiprocessors": 10,
        "bf16": True,
        "tf32": True,
        "max_clock_hz": 1.5e9,
    }
    profile = profiles._cuda_profile(device, "535.0")
    assert profile.usable_bytes == 8 * GIB - GIB // 2
    assert profile.peak_flops["fp32"] == pytest.approx(10 * 128 * 2 * 1.5e9)
    assert "no matching profile" in profile.description
    matched = profiles._cuda_profile(dict(device, name="NVIDIA GeForce RTX 3050 6GB Laptop GPU"), None)
    assert matched.peak_flops == get_profile("rtx3050-laptop-6gb").peak_flops


# ----------------------------------------------------------------------------- tightfit devices


def test_devices_json_lists_the_detected_device_and_every_profile(capsys):
    import json

    from tightfit.cli import main

    assert main(["devices", "--json", "--memory", "5GiB"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["detected"]["name"].startswith("current-")
    assert data["detected"]["usable_bytes"] == 5 * GIB
    names = [profile["name"] for profile in data["profiles"]]
    assert names == [profile.name for profile in list_profiles()]
    assert all(profile["usable_bytes"] == 5 * GIB for profile in data["profiles"])


def test_devices_table_and_one_profile_with_sources(capsys):
    from tightfit.cli import main

    assert main(["devices"]) == 0
    table = capsys.readouterr().out
    for name in REQUIRED:
        assert name in table
    assert main(["devices", "t4-16gb"]) == 0
    detail = capsys.readouterr().out
    assert "peak_flops.fp16" in detail and "65.00 TFLOP/s" in detail and "nvidia.com" in detail


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["devices", "rtx3050"], "did you mean rtx3050-laptop-6gb"),
        (["devices", "--memory", "lots"], "--memory"),
        (["devices", "cpu", "--memory", "6XB"], "unknown unit"),
    ],
)
def test_devices_bad_input_exits_2_with_one_line(argv, message, capsys):
    from tightfit.cli import main

    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


# ----------------------------------------------------------------------------- detection paths without the hardware


def fake_cuda(monkeypatch, name="NVIDIA GeForce RTX 3050 6GB Laptop GPU", total=6 * GIB, free=5 * GIB):
    """Make torch report one CUDA GPU (NVML absent), so the detection code runs on a CPU machine."""
    from types import SimpleNamespace

    from tightfit.hardware import detect

    properties = SimpleNamespace(
        name=name,
        total_memory=total,
        major=8,
        minor=6,
        multi_processor_count=20,
        clock_rate=1_500_000,
        memory_clock_rate=7_000_000,
        memory_bus_width=96,
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: properties)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (free, total))
    monkeypatch.setattr(detect, "_nvml_devices", lambda: None)


def test_detected_cuda_gpu_takes_the_matching_profile_figures(monkeypatch):
    fake_cuda(monkeypatch)
    profile = resolve_target("auto")
    assert profile.name == "current-cuda:0" and profile.device_type == "cuda"
    assert profile.memory_bytes == 6 * GIB
    assert profile.usable_bytes == 5 * GIB  # measured free memory, not the profile's share
    assert profile.peak_flops == get_profile("rtx3050-laptop-6gb").peak_flops
    assert profile.supports_bf16
    assert "rtx3050-laptop-6gb" in profile.description
    assert resolve_target("cuda:0", memory="3GiB").usable_bytes == 3 * GIB
    with pytest.raises(SpecError, match="1 CUDA device"):
        resolve_target("cuda:3")


def test_detected_cuda_report_fields(monkeypatch):
    from tightfit.hardware import detect

    fake_cuda(monkeypatch, name="NVIDIA Imaginary X1")
    report = detect.cuda_devices()
    assert report["available"] and report["device_count"] == 1 and report["nvml"] is False
    (device,) = report["devices"]
    assert device["compute_capability"] == "8.6" and device["bf16"] and device["tf32"]
    assert device["free_bytes"] == 5 * GIB and device["used_by_others_bytes"] is None
    assert device["max_clock_hz"] == 1.5e9
    assert device["memory_bandwidth"] == pytest.approx(2 * 7e9 * 96 / 8)  # 168 GB/s
    profile = profiles.detect_profile()
    assert "no matching profile" in profile.description
    assert profile.peak_flops["fp32"] == pytest.approx(20 * 128 * 2 * 1.5e9)
    assert profile.memory_bandwidth == pytest.approx(168e9)


def test_detected_mps_uses_metal_working_set(monkeypatch):
    from tightfit.hardware import detect

    monkeypatch.setattr(detect, "cuda_devices", lambda: {"available": False, "devices": []})
    monkeypatch.setattr(
        detect, "mps_info", lambda: {"built": True, "available": True, "recommended_max_bytes": int(10.67 * GIB)}
    )
    monkeypatch.setattr(detect, "chip_name", lambda: "Apple M1")
    profile = resolve_target("auto")
    assert profile.name == "current-mps" and profile.device_type == "mps" and profile.unified_memory
    assert profile.usable_bytes == int(10.67 * GIB)
    assert profile.memory_bytes == psutil.virtual_memory().total
    assert profile.peak_flops == get_profile("m1-16gb").peak_flops
    assert "recommended_max_memory" in profile.sources["usable_bytes"]
