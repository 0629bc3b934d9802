"""``tightfit doctor``: is this machine ready to train, and what should the user know?

The report is a recipe read top to bottom (:func:`run_doctor`): gather facts (system, torch,
accelerators, memory, disk, packages), run a smoke test on the best device, check the dataset
folder when one is given, then turn the facts into checks, plain-word recommendations and a
verdict. Every probe is guarded: a failure is recorded in the report, never raised, so the
report is still produced on a broken installation (that is when it is needed most).

Example:
    >>> from tightfit.hardware.doctor import run_doctor
    >>> report = run_doctor(smoke_test=False)
    >>> report["verdict"]["ready"], [check["name"] for check in report["checks"]]
"""

import importlib.metadata
import os
import re
import time
from collections.abc import Callable
from typing import Any

from tightfit import __version__
from tightfit.hardware import detect
from tightfit.units import format_bytes, plural

GIB = 2**30
MIN_PYTHON = (3, 10)
OK, WARN, FAIL, INFO = "ok", "warn", "fail", "info"

# Package -> what it is for. Distributions are looked up with importlib.metadata, never imported.
# "distributions" lists the pip names that provide it (the first is the one to install).
PACKAGES: dict[str, dict[str, Any]] = {
    "torch": {"for": "tensors, autograd and every device"},
    "numpy": {"for": "arrays in data loading and reports"},
    "pyyaml": {"for": "YAML configs and the device profiles"},
    "rich": {"for": "tables and progress bars"},
    "psutil": {"for": "memory and CPU facts"},
    "pydantic": {"for": "typed run configuration"},
    "safetensors": {"for": "checkpoint and adapter files"},
    "scikit-learn": {"for": "the built-in digits dataset and metrics"},
    "pillow": {"for": "image datasets and dataset checks"},
    "tensorboard": {"for": "TensorBoard logging"},
    "matplotlib": {"for": "plots in reports"},
    "torchvision": {"for": "torchvision: models and image transforms"},
    "transformers": {"for": "Hugging Face models (hf:DIR)"},
    "peft": {"for": "LoRA / QLoRA fine-tuning"},
    "diffusers": {"for": "diffusion LoRA (diffusion:DIR)"},
    "accelerate": {"for": "multi-GPU launches and large Hugging Face models"},
    "torchao": {"for": "quantization in `tightfit compress`"},
    "torch-pruning": {"for": "structured pruning in `tightfit compress`"},
    "onnx": {"for": "ONNX export"},
    "onnxscript": {"for": "ONNX export (the dynamo exporter)"},
    "onnxruntime": {"for": "running and timing exported ONNX models"},
    "mlflow": {"for": "MLflow experiment logging", "distributions": ("mlflow-skinny", "mlflow")},
    "bitsandbytes": {"for": "8-bit Adam (optimizer adam8bit) and 4-bit QLoRA on CUDA"},
    "xformers": {"for": "memory-efficient attention in diffusion models on CUDA"},
    "pynvml": {"for": "GPU memory and driver facts from NVML", "distributions": ("nvidia-ml-py", "pynvml")},
}
# Used when tightfit's own metadata is unavailable (running from a source tree without install).
FALLBACK_REQUIRED = (
    "torch",
    "numpy",
    "pyyaml",
    "rich",
    "psutil",
    "pydantic",
    "safetensors",
    "scikit-learn",
    "pillow",
    "tensorboard",
    "matplotlib",
)


def run_doctor(
    *,
    data_dir: str | os.PathLike | None = None,
    run_dir: str | os.PathLike = "runs",
    smoke_test: bool = True,
    progress: Callable[[str], None] | None = None,
    dataset_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Check this machine (and a dataset folder) and return the doctor's report.

    Args:
        data_dir: a dataset folder to check (see :func:`tightfit.data.inspect.inspect_dataset`).
        run_dir: where runs will be written; its file system's free space is checked.
        smoke_test: run the tiny allocate/matmul/train-step test on the best device.
        progress: called with the name of each stage as it starts.
        dataset_progress: called as ``(done, total)`` while dataset images are checked.

    Returns:
        A JSON-ready dict: ``tightfit_version, system, torch, cuda, mps, cpu, memory, disk,
        packages, smoke_test, dataset, best_device, checks, recommendations, verdict``.
        ``verdict["ready"]`` is false when a critical check failed.

    Raises:
        TightfitError: only for bad arguments (``data_dir`` missing), before anything runs.
    """
    if data_dir is not None:
        from tightfit.data.inspect import dataset_root

        dataset_root(data_dir)  # bad arguments fail before any work (exit status 2)

    def stage(name: str) -> None:
        if progress is not None:
            progress(name)

    report: dict[str, Any] = {"tightfit_version": __version__}
    stage("system")
    report["system"] = _guarded(detect.system_info)
    report["cpu"] = _guarded(detect.cpu_info)
    report["memory"] = _guarded(detect.memory_info)
    report["disk"] = _guarded(detect.disk_info, run_dir)
    stage("packages")
    report["packages"] = _guarded(package_report)
    stage("torch")
    report["torch"] = _guarded(detect.torch_info)
    torch_ok = "error" not in report["torch"]
    stage("accelerators")
    report["cuda"] = _guarded(detect.cuda_devices) if torch_ok else {"error": "torch is not importable"}
    report["mps"] = _guarded(detect.mps_info) if torch_ok else {"error": "torch is not importable"}
    report["best_device"] = _guarded(_best_device) if torch_ok else {"error": "torch is not importable"}
    report["memory"]["unified_memory"] = report["mps"].get("available", False)
    if torch_ok:
        stage("stable diffusion stack")
        report["sd_stack"] = _guarded(sd_stack_report)
    else:
        report["sd_stack"] = {"error": "torch is not importable"}
    if smoke_test and torch_ok:
        device_type = report["best_device"].get("device_type", "cpu")
        stage(f"smoke test on {device_type}")
        report["smoke_test"] = run_smoke_test(device_type)
    else:
        reason = "torch is not importable" if not torch_ok else "not requested (--no-smoke-test)"
        report["smoke_test"] = {"skipped": True, "reason": reason}
    if data_dir is not None:
        stage("dataset")
        from tightfit.data.inspect import inspect_dataset

        report["dataset"] = _guarded(inspect_dataset, data_dir, progress=dataset_progress)
    else:
        report["dataset"] = None
    report["checks"] = build_checks(report)
    report["recommendations"] = recommend(report)
    report["verdict"] = verdict(report["checks"])
    return report


# What seed-003's check_environment.py imports before a Stable Diffusion LoRA run (its tests 2
# and 3): the pipeline and its component classes, and PEFT's LoRA entry points.
SD_STACK = (
    ("diffusers", "StableDiffusionPipeline"),
    ("diffusers", "UNet2DConditionModel"),
    ("diffusers", "AutoencoderKL"),
    ("diffusers", "DDPMScheduler"),
    ("transformers", "CLIPTextModel"),
    ("transformers", "CLIPTokenizer"),
    ("peft", "LoraConfig"),
    ("peft", "get_peft_model"),
)


def sd_stack_report() -> dict[str, Any]:
    """Import every class of :data:`SD_STACK` and build seed-003's ``LoraConfig`` (rank 8 on the
    UNet attention); each failure is kept with its error, so the report says exactly what is broken.

    Returns:
        ``{"imports": [{"name", "ok", "error"}], "lora_config": {"ok", "error"}, "versions": {package: version}}``.
    """
    import importlib

    imports, versions = [], {}
    for package, name in SD_STACK:
        try:
            module = importlib.import_module(package)
            getattr(module, name)
            versions[package] = getattr(module, "__version__", "?")
            imports.append({"name": f"{package}.{name}", "ok": True, "error": None})
        except Exception as error:  # an import can fail with anything (a broken binary, a bad pin)
            imports.append(
                {"name": f"{package}.{name}", "ok": False, "error": f"{type(error).__name__}: {error}".splitlines()[0]}
            )
    lora_config = {"ok": False, "error": "peft did not import"}
    if all(item["ok"] for item in imports if item["name"].startswith("peft.")):
        try:
            importlib.import_module("peft").LoraConfig(
                r=8, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"]
            )
            lora_config = {"ok": True, "error": None}
        except Exception as error:
            lora_config = {"ok": False, "error": f"{type(error).__name__}: {error}".splitlines()[0]}
    return {"imports": imports, "lora_config": lora_config, "versions": versions}


def _guarded(function: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run a probe; a failure becomes ``{"error": "..."}`` so the rest of the report goes on."""
    try:
        return function(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - the doctor reports every failure instead of raising
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return {"error": f"{type(error).__name__}: {message}".rstrip(": ")}


def _best_device() -> dict[str, Any]:
    from tightfit.hardware.profiles import detect_profile

    profile = detect_profile()
    return {
        "name": profile.name,
        "device_type": profile.device_type,
        "description": profile.description,
        "memory_bytes": profile.memory_bytes,
        "usable_bytes": profile.usable_bytes,
        "peak_flops": profile.peak_flops,
        "supports_bf16": profile.supports_bf16,
        "unified_memory": profile.unified_memory,
    }


# ----------------------------------------------------------------------------- packages


def package_report() -> list[dict[str, Any]]:
    """Every required and optional package: installed version or missing, and what it is for.

    Required packages and minimum versions come from tightfit's installed metadata, so the
    report follows ``pyproject.toml``; the extra that installs an optional package is named.
    """
    requirements = _tightfit_requirements()
    rows = []
    for name, info in PACKAGES.items():
        distributions = info.get("distributions", (name,))
        requirement = next((requirements[dist] for dist in distributions if dist in requirements), None)
        version = None
        for dist in distributions:
            try:
                version = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        required = requirement["extra"] is None if requirement else name in FALLBACK_REQUIRED
        extra = requirement["extra"] if requirement else None
        minimum = requirement["minimum"] if requirement else None
        if version is None:
            status = "missing"
        elif minimum and not _at_least(version, minimum):
            status = "outdated"
        else:
            status = "installed"
        install = f'pip install "tightfit[{extra}]"' if extra else f"pip install {distributions[0]}"
        rows.append(
            {
                "name": name,
                "version": version,
                "required": required,
                "minimum": minimum,
                "extra": extra,
                "status": status,
                "needed_for": info["for"],
                "install": install if status != "installed" else None,
            }
        )
    return rows


def _tightfit_requirements() -> dict[str, dict[str, Any]]:
    """``{distribution: {"minimum", "extra"}}`` from tightfit's metadata (empty if not installed)."""
    try:
        lines = importlib.metadata.requires("tightfit") or []
    except importlib.metadata.PackageNotFoundError:
        return {}
    requirements = {}
    for line in lines:
        match = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*(?:>=\s*([0-9][^,;\s]*))?", line)
        if not match or match.group(1) == "tightfit":
            continue
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", line)
        requirements[match.group(1).lower()] = {"minimum": match.group(2), "extra": extra.group(1) if extra else None}
    return requirements


def _at_least(version: str, minimum: str) -> bool:
    try:
        from packaging.version import Version

        return Version(version) >= Version(minimum)
    except Exception:  # noqa: BLE001 - unparsable local versions are not a reason to fail the check
        numbers = [int(part) for part in re.findall(r"\d+", version)[:3]]
        return numbers >= [int(part) for part in re.findall(r"\d+", minimum)[:3]]


# ----------------------------------------------------------------------------- smoke test


def run_smoke_test(device_type: str) -> dict[str, Any]:
    """Allocate, multiply and train a tiny model for a few steps on ``device_type``.

    The matmul is compared with the CPU result, and the loss must fall over the steps, so a
    device that runs but computes garbage fails too. Failures are reported, never raised.

    Returns:
        ``{"device", "ok", "seconds", "steps": {"allocate", "matmul", "first_train_step",
        "train_step"} (seconds; ``train_step`` is the median after the first),
        "loss_before", "loss_after", "error"}``.
    """
    result: dict[str, Any] = {
        "device": device_type,
        "ok": False,
        "seconds": None,
        "steps": {},
        "loss_before": None,
        "loss_after": None,
        "error": None,
    }
    start = time.perf_counter()
    stage = "import torch"
    try:
        import torch

        from tightfit.step.step import TrainingStep

        start = time.perf_counter()  # time the device, not the (first) import

        device = torch.device(device_type)
        generator = torch.Generator().manual_seed(0)

        def synchronize() -> None:
            if device_type == "cuda":
                torch.cuda.synchronize()
            elif device_type == "mps":
                torch.mps.synchronize()

        stage = "allocate"
        begin = time.perf_counter()
        matrix_cpu = torch.randn(256, 256, generator=generator)
        matrix = matrix_cpu.to(device)
        synchronize()
        result["steps"]["allocate"] = time.perf_counter() - begin

        stage = "matmul"
        begin = time.perf_counter()
        product = (matrix @ matrix).cpu()
        result["steps"]["matmul"] = time.perf_counter() - begin
        # TF32 (on by default for convolutions, optional for matmul) keeps about 3 decimal digits.
        if not torch.allclose(product, matrix_cpu @ matrix_cpu, rtol=1e-2, atol=1e-1):
            raise RuntimeError("matmul result differs from the CPU result")

        stage = "train step"
        begin = time.perf_counter()
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).to(device)
        inputs = torch.randn(32, 16, generator=generator).to(device)
        targets = torch.randint(0, 4, (32,), generator=generator).to(device)
        # the trainer's own step (forward, backward, optimizer), so the check proves what a run needs
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        step = TrainingStep(model, optimizer, device=device, precision="fp32", micro_batch_size=len(inputs))
        losses, step_seconds = [], []
        for _ in range(5):
            outcome = step((inputs, targets))
            losses.append(float(outcome.loss.detach().cpu()))  # .cpu() waits for the device
            step_seconds.append(time.perf_counter() - begin)
            begin = time.perf_counter()
        # The first step pays for kernel selection and lazy initialisation; report it apart.
        result["steps"]["first_train_step"] = step_seconds[0]
        result["steps"]["train_step"] = sorted(step_seconds[1:])[len(step_seconds[1:]) // 2]
        result["loss_before"], result["loss_after"] = losses[0], losses[-1]
        if not losses[-1] < losses[0]:
            raise RuntimeError(f"loss did not fall over 5 SGD steps ({losses[0]:.4f} -> {losses[-1]:.4f})")
        result["ok"] = True
    except Exception as error:  # noqa: BLE001 - a broken device is a finding, not a crash
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        result["error"] = f"{stage}: {type(error).__name__}: {message}"
    result["seconds"] = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------- checks and verdict


def _check(name: str, status: str, summary: str, critical: bool = False) -> dict[str, Any]:
    return {"name": name, "status": status, "critical": critical, "summary": summary}


def build_checks(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Turn the facts into named checks; ``critical`` ones decide the verdict."""
    checks = []
    system = report["system"]
    if "error" in system:
        checks.append(_check("python", FAIL, system["error"], critical=True))
    else:
        version = tuple(int(part) for part in system["python_version"].split(".")[:2])
        ok = version >= MIN_PYTHON
        checks.append(
            _check(
                "python",
                OK if ok else FAIL,
                f"Python {system['python_version']} ({system['python_implementation']}) at {system['executable']}"
                + ("" if ok else f"; tightfit needs Python >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]}"),
                critical=True,
            )
        )
        checks.append(_check("os", INFO, f"{system['os']} {system['os_release']} ({system['architecture']})"))

    checks.append(_torch_check(report))
    checks.extend(_accelerator_checks(report))
    cpu = report["cpu"]
    if "error" not in cpu:
        clock = f", up to {cpu['max_frequency_hz'] / 1e9:.2f} GHz" if cpu.get("max_frequency_hz") else ""
        load = cpu.get("load_average_1min")
        busy = load is not None and load > (cpu["logical_cores"] or 1)
        checks.append(
            _check(
                "cpu",
                WARN if busy else INFO,
                f"{cpu['model']}: {cpu['physical_cores']} physical / {cpu['logical_cores']} logical cores{clock}"
                + (f"; load {load:.1f}" if load is not None else "")
                + ("; busy: other work competes for the cores, timings will be slower" if busy else ""),
            )
        )
    checks.extend(_memory_checks(report))
    checks.append(_disk_check(report["disk"]))
    checks.extend(_package_checks(report["packages"]))
    checks.append(_sd_stack_check(report.get("sd_stack")))
    checks.append(_smoke_check(report["smoke_test"]))
    if report.get("dataset") is not None:
        checks.append(_dataset_check(report["dataset"]))
    return checks


def _torch_check(report: dict[str, Any]) -> dict[str, Any]:
    info = report["torch"]
    if "error" in info:
        return _check("torch", FAIL, f"torch cannot be imported ({info['error']}): pip install torch", critical=True)
    build = (
        f"CUDA {info['cuda_build']}"
        if info["cuda_build"]
        else ("ROCm " + info["hip_build"] if info["hip_build"] else "CPU-only")
    )
    extras = []
    if info["cudnn_version"]:
        extras.append(f"cuDNN {info['cudnn_version']}")
    extras.append("MPS built" if info["mps_built"] else "no MPS")
    return _check("torch", OK, f"torch {info['version']} ({build} build; {', '.join(extras)})", critical=True)


def _accelerator_checks(report: dict[str, Any]) -> list[dict[str, Any]]:
    checks = []
    cuda, mps = report["cuda"], report["mps"]
    if "error" in cuda:
        checks.append(_check("cuda", WARN, f"CUDA could not be queried: {cuda['error']}"))
    elif cuda["available"]:
        for device in cuda["devices"]:
            free = format_bytes(device["free_bytes"]) if device["free_bytes"] is not None else "unknown"
            low = device["free_bytes"] is not None and device["free_bytes"] < GIB
            checks.append(
                _check(
                    f"cuda:{device['index']}",
                    WARN if low else OK,
                    f"{device['name']}: {format_bytes(device['total_bytes'])} total, {free} free, compute capability "
                    f"{device['compute_capability']}, bf16 {'yes' if device['bf16'] else 'no'}, "
                    f"TF32 {'yes' if device['tf32'] else 'no'}"
                    + (f", driver {cuda['driver_version']}" if cuda.get("driver_version") else "")
                    + ("; less than 1 GiB free: other processes hold this GPU" if low else ""),
                )
            )
    else:
        checks.append(
            _check(
                "cuda",
                INFO,
                "no CUDA GPU visible"
                + (
                    f" (torch is a CUDA {report['torch']['cuda_build']} build)"
                    if report["torch"].get("cuda_build")
                    else ""
                ),
            )
        )
    if "error" not in mps and (mps.get("built") or mps.get("available")):
        if mps["available"]:
            recommended = mps.get("recommended_max_bytes")
            checks.append(
                _check(
                    "mps",
                    OK,
                    "Apple MPS available"
                    + (f"; Metal recommends at most {format_bytes(recommended)} for the GPU" if recommended else ""),
                )
            )
        else:
            checks.append(_check("mps", INFO, "torch has MPS built in, but MPS is not available on this machine"))
    best = report["best_device"]
    if "error" not in best:
        checks.append(
            _check(
                "best device",
                INFO,
                f"{best['device_type']}: {best['description']}; "
                f"{format_bytes(best['usable_bytes'])} usable for training",
            )
        )
    return checks


def _memory_checks(report: dict[str, Any]) -> list[dict[str, Any]]:
    memory = report["memory"]
    if "error" in memory:
        return [_check("memory", WARN, f"memory could not be read: {memory['error']}")]
    available = memory["available_bytes"]
    status = WARN if available < 4 * GIB else OK
    summary = (
        f"{format_bytes(memory['total_bytes'])} total, {format_bytes(available)} available "
        f"({memory['used_percent']:.0f}% used)"
    )
    if memory.get("unified_memory"):
        summary += "; unified memory: the GPU shares it with macOS and every open app"
    if available < 4 * GIB:
        summary += "; little memory available"
    checks = [_check("memory", status, summary)]
    swap_total, swap_used = memory["swap_total_bytes"], memory["swap_used_bytes"]
    heavy_swap = swap_used > max(GIB, 0.1 * memory["total_bytes"])
    checks.append(
        _check(
            "swap",
            WARN if heavy_swap else INFO,
            f"{format_bytes(swap_used)} used of {format_bytes(swap_total)}"
            + ("; heavy swapping makes training very slow" if heavy_swap else ""),
        )
    )
    return checks


def _disk_check(disk: dict[str, Any]) -> dict[str, Any]:
    if "error" in disk:
        return _check("disk", WARN, f"free space could not be read: {disk['error']}")
    free = disk["free_bytes"]
    status = FAIL if free < GIB else (WARN if free < 10 * GIB else OK)
    return _check(
        "disk",
        status,
        f"{format_bytes(free)} free at {disk['path']}"
        + ("; runs need room for checkpoints and logs" if status != OK else ""),
        critical=True,
    )


def _package_checks(packages: Any) -> list[dict[str, Any]]:
    if isinstance(packages, dict) and "error" in packages:
        return [_check("packages", WARN, f"packages could not be listed: {packages['error']}")]
    required_bad = [row for row in packages if row["required"] and row["status"] != "installed"]
    optional_missing = [row["name"] for row in packages if not row["required"] and row["status"] != "installed"]
    required_count = sum(row["required"] for row in packages)
    if required_bad:
        described = ", ".join(
            f"{row['name']} {row['status']}"
            + (f" (need >= {row['minimum']}, have {row['version']})" if row["status"] == "outdated" else "")
            for row in required_bad
        )
        summary = f"required: {described}; reinstall with pip install tightfit"
        checks = [_check("required packages", FAIL, summary, critical=True)]
    else:
        checks = [_check("required packages", OK, f"all {required_count} installed", critical=True)]
    optional_count = len(packages) - required_count
    checks.append(
        _check(
            "optional packages",
            INFO,
            f"{optional_count - len(optional_missing)} of {optional_count} installed"
            + (f"; missing: {', '.join(optional_missing)}" if optional_missing else ""),
        )
    )
    return checks


def _sd_stack_check(stack: dict[str, Any] | None) -> dict[str, Any]:
    if stack is None or "error" in stack:
        return _check("stable diffusion stack", WARN, f"not checked ({(stack or {}).get('error', 'no report')})")
    failed = [item for item in stack["imports"] if not item["ok"]]
    versions = ", ".join(f"{package} {version}" for package, version in stack["versions"].items())
    if failed or not stack["lora_config"]["ok"]:
        problems = [f"{item['name']} ({item['error']})" for item in failed]
        if not stack["lora_config"]["ok"]:
            problems.append(f"LoraConfig for the UNet ({stack['lora_config']['error']})")
        return _check(
            "stable diffusion stack", WARN, "cannot import " + "; ".join(problems) + ' (pip install "tightfit[hf]")'
        )
    return _check(
        "stable diffusion stack",
        OK,
        f"{len(stack['imports'])} classes imported and a UNet LoraConfig built ({versions})",
    )


def _smoke_check(smoke: dict[str, Any]) -> dict[str, Any]:
    if smoke.get("skipped"):
        return _check("smoke test", INFO, f"skipped ({smoke['reason']})")
    if smoke["ok"]:
        steps = smoke["steps"]
        return _check(
            "smoke test",
            OK,
            (
                f"{smoke['device']}: allocate, matmul and 5 training steps in {smoke['seconds']:.2f} s "
                f"(matmul {steps['matmul'] * 1e3:.1f} ms, first train step {steps['first_train_step']:.2f} s, "
                f"then {steps['train_step'] * 1e3:.1f} ms each; "
                f"loss {smoke['loss_before']:.3f} -> {smoke['loss_after']:.3f})"
            ),
            critical=True,
        )
    return _check("smoke test", FAIL, f"{smoke['device']}: failed at {smoke['error']}", critical=True)


def _dataset_check(dataset: dict[str, Any]) -> dict[str, Any]:
    if "error" in dataset:
        return _check("dataset", FAIL, f"dataset could not be checked: {dataset['error']}", critical=True)
    errors = [problem for problem in dataset["problems"] if problem["severity"] == "error"]
    warnings = [problem for problem in dataset["problems"] if problem["severity"] == "warning"]
    counts = ", ".join(f"{name} {split['images']}" for name, split in dataset["splits"].items())
    summary = f"{dataset['layout']}, {dataset['total_images']} images ({counts})"
    if errors:
        summary += f"; {len(errors)} error(s), {len(warnings)} warning(s)"
        return _check("dataset", FAIL, summary, critical=True)
    if warnings:
        return _check("dataset", WARN, summary + f"; {len(warnings)} warning(s)", critical=True)
    return _check("dataset", OK, summary, critical=True)


def verdict(checks: list[dict[str, Any]]) -> dict[str, Any]:
    """``ready`` unless a critical check failed; warnings are listed but do not block."""
    failed = [check["name"] for check in checks if check["critical"] and check["status"] == FAIL]
    warnings = [check["name"] for check in checks if check["status"] in (WARN, FAIL) and check["name"] not in failed]
    if failed:
        return {
            "ready": False,
            "status": "not ready",
            "failed": failed,
            "warnings": warnings,
            "summary": f"not ready: {', '.join(failed)} failed",
        }
    if warnings:
        return {
            "ready": True,
            "status": "ready, with warnings",
            "failed": [],
            "warnings": warnings,
            "summary": f"ready, with warnings about {', '.join(warnings)}",
        }
    return {"ready": True, "status": "ready", "failed": [], "warnings": [], "summary": "ready to train"}


# ----------------------------------------------------------------------------- recommendations


def recommend(report: dict[str, Any]) -> list[str]:
    """Plain-word advice derived from what the report found."""
    advice: list[str] = []
    cuda, mps, memory, torch_info = report["cuda"], report["mps"], report["memory"], report["torch"]
    gpus = cuda.get("devices", []) if "error" not in cuda else []
    for device in gpus:
        name = f"cuda:{device['index']} ({device['name']})"
        if device["bf16"]:
            advice.append(
                f"{name} supports bf16: prefer `precision: bf16` to fp16 (the range of fp32, no loss "
                "scaling); TF32 speeds up the fp32 matmuls that remain."
            )
        else:
            advice.append(
                f"{name} has no native bf16 (compute capability {device['compute_capability']}): use "
                "`precision: fp16`, which trains with a gradient scaler."
            )
        if device["total_bytes"] <= 8 * GIB:
            advice.append(
                f"{name} has {format_bytes(device['total_bytes'])}: expect small batches. Run "
                "`tightfit plan` before training; activation checkpointing, gradient accumulation and "
                "8-bit Adam are the usual ways to fit."
            )
        if device["free_bytes"] is not None and device["free_bytes"] < 0.8 * device["total_bytes"]:
            advice.append(
                f"{name}: {format_bytes(device['total_bytes'] - device['free_bytes'])} already in use by "
                "other processes (nvidia-smi lists them); close them or plan with `--memory` set to the "
                "free amount."
            )
    if gpus and not _installed(report, "bitsandbytes"):
        advice.append(
            "bitsandbytes is missing: `optimizer: adam8bit` and 4-bit QLoRA need it (pip install bitsandbytes)."
        )
    if "error" not in torch_info and not gpus:
        if torch_info.get("cuda_build") and not mps.get("available"):
            advice.append(
                f"torch is a CUDA {torch_info['cuda_build']} build but sees no GPU: if this machine has an "
                "NVIDIA GPU, check the driver with `nvidia-smi`; otherwise this is fine."
            )
    if mps.get("available"):
        recommended = mps.get("recommended_max_bytes")
        advice.append(
            "Unified memory: the GPU shares " + format_bytes(memory.get("total_bytes")) + " with macOS and every open "
            "app"
            + (f"; Metal recommends at most {format_bytes(recommended)} for it" if recommended else "")
            + ". Close memory-hungry apps before long runs; `precision: fp16` halves activation memory."
        )
        if not mps.get("fallback_enabled"):
            advice.append(
                "Set PYTORCH_ENABLE_MPS_FALLBACK=1 so an operation MPS lacks runs on the CPU instead of failing."
            )
    if "error" not in torch_info and not gpus and not mps.get("available"):
        cores = report["cpu"].get("physical_cores") if "error" not in report["cpu"] else None
        advice.append(
            "No GPU: training runs on the CPU. Start with small models (builtin:digits-cnn, builtin:mlp); "
            "`tightfit plan --device rtx3050-laptop-6gb` plans for a GPU you could use."
            + (
                f" Use at most {plural(max(1, cores - 1), 'data-loader worker')} on {plural(cores, 'core')}."
                if cores
                else ""
            )
        )
    if "error" not in memory:
        available = memory["available_bytes"]
        if available < 8 * GIB:
            advice.append(
                f"{format_bytes(available)} of system memory available: expect small batches and keep "
                "`data.num_workers` low; see `tightfit plan`."
            )
        if memory["swap_used_bytes"] > max(GIB, 0.1 * memory["total_bytes"]):
            advice.append(
                f"{format_bytes(memory['swap_used_bytes'])} of swap in use: the system is short of memory, "
                "and swapping makes training many times slower."
            )
    disk = report["disk"]
    if "error" not in disk and disk["free_bytes"] < 10 * GIB:
        advice.append(
            f"Only {format_bytes(disk['free_bytes'])} free at {disk['path']}: keep fewer checkpoints "
            "(`checkpoint.keep_top_k`) or write runs elsewhere (`run_dir`)."
        )
    packages = report["packages"]
    if isinstance(packages, list):
        by_extra: dict[str, list[str]] = {}
        for row in packages:
            if not row["required"] and row["status"] != "installed" and row["extra"]:
                by_extra.setdefault(row["extra"], []).append(row["name"])
        for extra, names in by_extra.items():
            purposes = "; ".join(PACKAGES[name]["for"] for name in names)
            advice.append(f'pip install "tightfit[{extra}]" for {purposes} ({", ".join(names)} missing).')
    smoke = report["smoke_test"]
    if not smoke.get("skipped") and not smoke.get("ok"):
        advice.append(
            f"The smoke test failed on {smoke['device']} ({smoke['error']}): reinstall torch for this "
            "platform, or train on the CPU (`device: cpu`) until it is fixed."
        )
    dataset = report.get("dataset")
    if dataset and "error" not in dataset:
        for problem in dataset["problems"]:
            if problem["kind"] == "corrupt_images":
                advice.append(f"{problem['message']}: remove or replace them (or set `data.on_corrupt: skip`).")
            elif problem["kind"] in ("missing_captions", "orphaned_captions"):
                advice.append(f"{problem['message']}: fix the caption file so every image has exactly one caption.")
            elif problem["kind"] == "empty_classes":
                advice.append(f"{problem['message']}: add images or delete the folders, or the class count is wrong.")
            elif problem["kind"] == "duplicates_across_splits":
                advice.append(
                    "Some images appear in more than one split: remove the copies so the validation and "
                    "test scores are honest."
                )
    return advice


def _installed(report: dict[str, Any], name: str) -> bool:
    packages = report["packages"]
    return isinstance(packages, list) and any(row["name"] == name and row["status"] == "installed" for row in packages)
