"""`tightfit doctor`: the report on this machine agrees with psutil/torch; checks, advice, exit codes."""

import copy
import importlib.metadata
import json
import platform
from pathlib import Path

import psutil
import pytest
import torch
from PIL import Image

from conftest import run_tightfit
from tightfit.cli import main
from tightfit.hardware import doctor
from tightfit.hardware.doctor import build_checks, recommend, run_doctor, run_smoke_test, verdict

GIB = 2**30
SECTIONS = (
    "tightfit_version",
    "system",
    "torch",
    "cuda",
    "mps",
    "cpu",
    "memory",
    "disk",
    "packages",
    "smoke_test",
    "dataset",
    "best_device",
    "checks",
    "recommendations",
    "verdict",
)


@pytest.fixture(scope="module")
def cli_json(tmp_path_factory):
    """One real `tightfit doctor --json` run on this machine, smoke test included."""
    run_dir = tmp_path_factory.mktemp("runs") / "not-yet-created"
    result = run_tightfit("doctor", "--json", "--run-dir", str(run_dir))
    return result, run_dir


@pytest.fixture(scope="module")
def base_report():
    """An in-process report without the smoke test, to derive fabricated cases from."""
    return run_doctor(smoke_test=False)


def test_json_is_valid_and_complete(cli_json):
    result, _run_dir = cli_json
    report = json.loads(result.stdout)
    assert set(SECTIONS) <= set(report)
    assert result.returncode == (0 if report["verdict"]["ready"] else 1), result.stderr
    assert "Traceback" not in result.stderr


def test_json_agrees_with_psutil_and_torch(cli_json):
    result, run_dir = cli_json
    report = json.loads(result.stdout)
    assert report["memory"]["total_bytes"] == psutil.virtual_memory().total
    assert report["memory"]["swap_total_bytes"] == psutil.swap_memory().total
    assert report["cpu"]["logical_cores"] == psutil.cpu_count(logical=True)
    assert report["cpu"]["physical_cores"] == psutil.cpu_count(logical=False)
    assert report["cuda"]["available"] == torch.cuda.is_available()
    assert report["cuda"]["device_count"] == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert report["mps"]["built"] == torch.backends.mps.is_built()
    assert report["mps"]["available"] == torch.backends.mps.is_available()
    assert report["torch"]["version"] == torch.__version__
    assert report["torch"]["cuda_build"] == torch.version.cuda
    assert report["system"]["python_version"] == platform.python_version()
    assert report["disk"]["path"] == str(run_dir)
    assert report["disk"]["free_bytes"] > 0
    torch_row = next(row for row in report["packages"] if row["name"] == "torch")
    assert torch_row["version"] == importlib.metadata.version("torch") and torch_row["required"]
    expected_device = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert report["best_device"]["device_type"] == expected_device
    assert report["smoke_test"]["device"] == expected_device


def test_smoke_test_passed_and_was_timed(cli_json):
    report = json.loads(cli_json[0].stdout)
    smoke = report["smoke_test"]
    assert smoke["ok"] is True, smoke["error"]
    assert smoke["seconds"] > 0 and set(smoke["steps"]) == {"allocate", "matmul", "first_train_step", "train_step"}
    assert smoke["loss_after"] < smoke["loss_before"]
    smoke_check = next(check for check in report["checks"] if check["name"] == "smoke test")
    assert smoke_check["status"] == "ok" and smoke_check["critical"]


def test_every_check_is_well_formed(cli_json):
    report = json.loads(cli_json[0].stdout)
    names = [check["name"] for check in report["checks"]]
    for required in ("python", "torch", "memory", "disk", "required packages", "smoke test"):
        assert required in names
    for check in report["checks"]:
        assert check["status"] in ("ok", "warn", "fail", "info")
        assert check["summary"]
    # Required packages are all installed in the test environment.
    assert all(row["status"] == "installed" for row in report["packages"] if row["required"])


def test_table_output_shows_checks_packages_and_verdict(tmp_path, capsys):
    code = main(["doctor", "--no-smoke-test", "--run-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Checks" in out and "Packages" in out and "Verdict: ready" in out
    # Markup-looking text such as an extra's name is printed literally, not eaten by rich.
    assert "[hf]" in out


def test_missing_data_folder_exits_2_before_running(tmp_path):
    result = run_tightfit("doctor", "--json", "--data", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--data" in lines[0] and "does not exist" in lines[0]


def test_run_dir_that_is_a_file_exits_2(tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("keep me")
    result = run_tightfit("doctor", "--run-dir", str(blocker))
    assert result.returncode == 2 and "--run-dir" in result.stderr
    assert blocker.read_text() == "keep me"


def test_dataset_problems_exit_1_and_are_named(tmp_path, capsys):
    data = tmp_path / "data"
    for split in ("train", "val"):
        for cls, color in (("cat", 10), ("dog", 20)):
            (data / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8), (color, len(split), 0)).save(data / split / cls / "0.png")
    (data / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    code = main(["doctor", "--json", "--no-smoke-test", "--data", str(data), "--run-dir", str(tmp_path)])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    assert report["verdict"]["ready"] is False and "dataset" in report["verdict"]["failed"]
    assert [entry["file"] for entry in report["dataset"]["splits"]["train"]["corrupt"]] == ["train/cat/broken.png"]
    assert any("broken.png" in advice for advice in report["recommendations"])


def test_failed_smoke_test_exits_1(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(doctor, "run_smoke_test", lambda device_type: run_smoke_test("meta"))
    code = main(["doctor", "--json", "--run-dir", str(tmp_path)])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    assert report["smoke_test"]["ok"] is False and report["smoke_test"]["error"]
    assert "smoke test" in report["verdict"]["failed"]
    assert any("smoke test failed" in advice for advice in report["recommendations"])


def test_smoke_test_reports_failures_instead_of_raising():
    # The meta device has no data: the matmul result cannot be copied back, so the test must fail cleanly.
    result = run_smoke_test("meta")
    assert result["ok"] is False
    assert result["error"].startswith("matmul")
    assert result["seconds"] >= 0


def test_a_probe_that_crashes_is_reported_and_the_report_goes_on(monkeypatch):
    def broken():
        raise RuntimeError("driver exploded\nsecond line")

    monkeypatch.setattr(doctor.detect, "cuda_devices", broken)
    report = run_doctor(smoke_test=False)
    assert report["cuda"] == {"error": "RuntimeError: driver exploded"}
    cuda_check = next(check for check in report["checks"] if check["name"] == "cuda")
    assert cuda_check["status"] == "warn"
    assert "verdict" in report


def test_old_python_fails_the_critical_check(base_report):
    report = copy.deepcopy(base_report)
    report["system"]["python_version"] = "3.9.18"
    checks = build_checks(report)
    python = next(check for check in checks if check["name"] == "python")
    assert python["status"] == "fail" and "3.10" in python["summary"]
    assert verdict(checks)["ready"] is False


def test_missing_or_outdated_required_package_fails(monkeypatch, base_report):
    real_version = importlib.metadata.version

    def fake_version(name):
        if name == "rich":
            return "1.0"
        if name == "peft":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(doctor.importlib.metadata, "version", fake_version)
    rows = {row["name"]: row for row in doctor.package_report()}
    assert rows["rich"]["status"] == "outdated" and rows["rich"]["minimum"]
    assert rows["peft"]["status"] == "missing" and rows["peft"]["install"] == 'pip install "tightfit[hf]"'
    assert rows["peft"]["required"] is False
    report = copy.deepcopy(base_report)
    report["packages"] = list(rows.values())
    checks = build_checks(report)
    required = next(check for check in checks if check["name"] == "required packages")
    assert required["status"] == "fail" and "rich outdated" in required["summary"]
    assert verdict(checks)["failed"] == ["required packages"]
    assert any("tightfit[hf]" in advice and "peft" in advice for advice in recommend(report))


def test_low_disk_fails_and_is_advised(base_report):
    report = copy.deepcopy(base_report)
    report["disk"]["free_bytes"] = GIB // 2
    checks = build_checks(report)
    assert next(check for check in checks if check["name"] == "disk")["status"] == "fail"
    assert any("keep_top_k" in advice for advice in recommend(report))


def fake_gpu(bf16: bool, total=6 * GIB, free=6 * GIB - 300 * 2**20):
    return {
        "index": 0,
        "name": "NVIDIA GeForce RTX 3050 6GB Laptop GPU",
        "total_bytes": total,
        "free_bytes": free,
        "used_by_others_bytes": total - free,
        "compute_capability": "8.6" if bf16 else "7.5",
        "multiprocessors": 20,
        "bf16": bf16,
        "tf32": bf16,
        "max_clock_hz": None,
    }


def test_recommendations_follow_the_gpu(base_report):
    report = copy.deepcopy(base_report)
    report["cuda"] = {
        "available": True,
        "device_count": 1,
        "driver_version": "535.274.02",
        "nvml": True,
        "devices": [fake_gpu(bf16=True)],
    }
    advice = " ".join(recommend(report))
    assert "supports bf16" in advice and "tightfit plan" in advice
    assert "No GPU" not in advice
    report["cuda"]["devices"] = [fake_gpu(bf16=False, total=16 * GIB, free=4 * GIB)]
    advice = " ".join(recommend(report))
    assert "precision: fp16" in advice and "supports bf16" not in advice
    assert "already in use by other processes" in advice
    check = next(check for check in build_checks(report) if check["name"] == "cuda:0")
    assert "driver 535.274.02" in check["summary"] and "compute capability 7.5" in check["summary"]


def test_unified_memory_advice_on_mps(base_report):
    report = copy.deepcopy(base_report)
    report["cuda"] = {"available": False, "device_count": 0, "driver_version": None, "nvml": False, "devices": []}
    report["mps"] = {"built": True, "available": True, "recommended_max_bytes": int(10.67 * GIB)}
    report["memory"]["unified_memory"] = True
    advice = " ".join(recommend(report))
    assert "Unified memory" in advice and "10.67 GiB" in advice
    assert "PYTORCH_ENABLE_MPS_FALLBACK" in advice
    memory_check = next(check for check in build_checks(report) if check["name"] == "memory")
    assert "unified memory" in memory_check["summary"]
    report["mps"]["fallback_enabled"] = True
    assert "PYTORCH_ENABLE_MPS_FALLBACK" not in " ".join(recommend(report))


def test_low_memory_and_swapping_are_flagged(base_report):
    report = copy.deepcopy(base_report)
    report["memory"].update(
        total_bytes=16 * GIB,
        available_bytes=3 * GIB,
        swap_total_bytes=8 * GIB,
        swap_used_bytes=4 * GIB,
        used_percent=81.0,
    )
    checks = {check["name"]: check for check in build_checks(report)}
    assert checks["memory"]["status"] == "warn" and checks["swap"]["status"] == "warn"
    assert not checks["memory"]["critical"]
    advice = " ".join(recommend(report))
    assert "3.00 GiB of system memory available" in advice and "swap in use" in advice


def test_verdict_levels():
    ok = {"name": "a", "status": "ok", "critical": True, "summary": "."}
    warn = {"name": "b", "status": "warn", "critical": False, "summary": "."}
    fail = {"name": "c", "status": "fail", "critical": True, "summary": "."}
    assert verdict([ok]) == {
        "ready": True,
        "status": "ready",
        "failed": [],
        "warnings": [],
        "summary": "ready to train",
    }
    assert verdict([ok, warn])["status"] == "ready, with warnings" and verdict([ok, warn])["warnings"] == ["b"]
    assert verdict([ok, warn, fail])["ready"] is False and verdict([ok, warn, fail])["failed"] == ["c"]


def test_run_dir_that_does_not_exist_checks_its_parent(tmp_path):
    from tightfit.hardware.detect import disk_info

    info = disk_info(tmp_path / "a" / "b")
    assert info["checked"] == str(tmp_path) and Path(info["path"]) == tmp_path / "a" / "b"


@pytest.mark.gpu
@pytest.mark.gpu
def test_doctor_on_cuda_reports_every_gpu_and_passes_the_smoke_test():
    report = run_doctor()
    assert report["cuda"]["device_count"] == torch.cuda.device_count()
    for device in report["cuda"]["devices"]:
        properties = torch.cuda.get_device_properties(device["index"])
        assert device["name"] == properties.name and device["total_bytes"] == properties.total_memory
        assert device["compute_capability"] == f"{properties.major}.{properties.minor}"
        assert device["free_bytes"] is not None and 0 < device["free_bytes"] <= device["total_bytes"]
    assert report["smoke_test"]["device"] == "cuda" and report["smoke_test"]["ok"], report["smoke_test"]["error"]


def test_broken_torch_is_a_failed_check_not_a_crash(monkeypatch):
    def no_torch():
        raise ImportError("libtorch_cpu.so: cannot open shared object file")

    monkeypatch.setattr(doctor.detect, "torch_info", no_torch)
    report = run_doctor()
    assert report["torch"]["error"].startswith("ImportError")
    assert report["smoke_test"]["skipped"] and "torch" in report["smoke_test"]["reason"]
    assert report["verdict"]["ready"] is False and "torch" in report["verdict"]["failed"]
    torch_check = next(check for check in report["checks"] if check["name"] == "torch")
    assert "pip install torch" in torch_check["summary"]


def test_sd_stack_is_imported_as_seed_003_does_and_a_failure_is_named(monkeypatch, base_report):
    pytest.importorskip("diffusers")
    stack = doctor.sd_stack_report()
    assert [item["name"] for item in stack["imports"]][:2] == [
        "diffusers.StableDiffusionPipeline",
        "diffusers.UNet2DConditionModel",
    ]
    assert all(item["ok"] for item in stack["imports"]) and stack["lora_config"]["ok"]
    check = next(
        check for check in build_checks(base_report | {"sd_stack": stack}) if check["name"] == "stable diffusion stack"
    )
    assert check["status"] == "ok" and "8 classes imported" in check["summary"]

    real_import = importlib.import_module

    def broken_import(name, *args):
        if name == "transformers":
            raise ImportError("libtorch_cpu.so: undefined symbol")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", broken_import)
    stack = doctor.sd_stack_report()
    failed = [item["name"] for item in stack["imports"] if not item["ok"]]
    assert failed == ["transformers.CLIPTextModel", "transformers.CLIPTokenizer"]
    check = next(
        check for check in build_checks(base_report | {"sd_stack": stack}) if check["name"] == "stable diffusion stack"
    )
    assert check["status"] == "warn" and "transformers.CLIPTextModel (ImportError: libtorch_cpu.so" in check["summary"]
