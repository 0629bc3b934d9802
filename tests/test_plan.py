"""`tightfit plan`: check a batch size, recommend settings, plan pipelines, without allocating weights."""

import json
import resource
from pathlib import Path

import pytest
import torch

from conftest import run_tightfit
from tightfit.hardware.profiles import get_profile, with_budget
from tightfit.memory.estimator import estimate_step
from tightfit.memory.report import CATEGORIES
from tightfit.models.spec import build_model, make_batch_factory, parse_input_spec
from tightfit.plan.pipeline import SVM_KERNEL_CACHE_BYTES
from tightfit.plan.planner import plan

REPOSITORY = Path(__file__).resolve().parents[1]
LLAMA_7B = REPOSITORY / "src" / "tightfit" / "configs" / "llama-7b"
MiB = 2**20


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core CI machine: one intra-op thread avoids oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cli(*arguments, timeout=600):
    return run_tightfit("plan", *arguments, timeout=timeout, cwd=REPOSITORY)


def _budget(nbytes):
    return with_budget(get_profile("cpu"), int(nbytes))


def test_check_json_fields():
    completed = _cli(
        "--model",
        "builtin:mlp",
        "--input",
        "1x8x8",
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--memory",
        "64MiB",
        "--json",
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert set(result["breakdown"]) == set(CATEGORIES)
    assert sum(result["breakdown"].values()) == result["peak_bytes"]
    assert result["budget_bytes"] == 64 * MiB
    assert result["fits"] is True and result["verdict"] == "fits"
    assert result["recommendation"] is None
    # MLP 64-256-128-10: 50,826 fp32 parameters, their gradients and AdamW's two state slots.
    assert result["breakdown"]["parameters"] == 50_826 * 4
    assert result["breakdown"]["optimizer"] >= 2 * 50_826 * 4
    assert result["flops_per_step"] > 0 and result["step_time_s"] > 0


def test_verdicts_follow_the_budget():
    peak = plan("builtin:mlp", "1x8x8", batch_size=16, profile=_budget(2**30)).peak_bytes
    roomy = plan("builtin:mlp", "1x8x8", batch_size=16, profile=_budget(2 * peak))
    tight = plan("builtin:mlp", "1x8x8", batch_size=16, profile=_budget(1.02 * peak))
    over = plan("builtin:mlp", "1x8x8", batch_size=16, profile=_budget(0.9 * peak))
    assert (roomy.verdict, roomy.fits) == ("fits", True)
    assert (tight.verdict, tight.fits) == ("tight", True)
    assert (over.verdict, over.fits) == ("does not fit", False)
    assert "exceeds" in over.why and "--batch-size" in over.why


def test_recommended_micro_batch_is_the_largest_that_fits():
    profile = _budget(3 * MiB)
    result = plan("builtin:mlp", "1x8x8", profile=profile, margin=0.1)
    recommendation = result.recommendation
    assert set(recommendation) >= {"micro_batch_size", "accumulation_steps", "precision", "checkpointing", "optimizer"}
    assert recommendation["accumulation_steps"] == 1 and result.fits
    micro = recommendation["micro_batch_size"]
    threshold = profile.usable_bytes * 0.9
    batch_factory = make_batch_factory(parse_input_spec("1x8x8"), build_model("builtin:mlp"))

    def peak(batch):
        return estimate_step(
            lambda: build_model("builtin:mlp"),
            batch_factory,
            batch_size=batch,
            precision=recommendation["precision"],
            optimizer=recommendation["optimizer"],
            profile=profile,
        ).peak_bytes

    assert peak(micro) <= threshold < peak(micro + 1)
    assert result.peak_bytes == peak(micro)


def test_effective_batch_is_reached_by_accumulation():
    result = plan("builtin:mlp", "1x8x8", profile=_budget(3 * MiB), effective_batch_size=3000, precision="fp32")
    recommendation = result.recommendation
    largest = plan("builtin:mlp", "1x8x8", profile=_budget(3 * MiB), precision="fp32").recommendation
    assert recommendation["accumulation_steps"] > 1
    assert recommendation["micro_batch_size"] * recommendation["accumulation_steps"] == 3000  # exact, not shrunk
    assert recommendation["micro_batch_size"] <= largest["micro_batch_size"]


def test_nothing_fits():
    result = plan("builtin:mlp", "1x8x8", profile=_budget(64 * 1024))
    assert result.verdict == "does not fit" and result.fits is False and result.recommendation is None
    assert "even batch 1" in result.why
    assert all(option["fits"] is not True for option in result.alternatives)


def test_checkpointing_is_chosen_when_it_is_what_fits():
    kwargs = {"dim": 64, "depth": 4, "heads": 2, "vocab_size": 128, "max_length": 256}
    roomy = plan(
        "builtin:tiny-gpt",
        "tokens:256",
        profile=_budget(2**30),
        precision="fp32",
        effective_batch_size=8,
        model_kwargs=kwargs,
    )
    assert roomy.recommendation["checkpointing"] is False
    plain_peak = roomy.peak_bytes  # batch 8 without checkpointing
    squeezed = plan(
        "builtin:tiny-gpt",
        "tokens:256",
        profile=_budget(plain_peak * 0.8 / 0.9),
        precision="fp32",
        effective_batch_size=8,
        model_kwargs=kwargs,
    )
    recommendation = squeezed.recommendation
    # Either checkpointing reaches batch 8 in one micro-batch, or accumulation does it; both keep 8.
    assert recommendation["micro_batch_size"] * recommendation["accumulation_steps"] == 8
    assert squeezed.peak_bytes <= plain_peak * 0.8
    labels = {(option["precision"], option["checkpointing"]) for option in squeezed.alternatives}
    assert ("fp32", not recommendation["checkpointing"]) in labels


@pytest.mark.parametrize(
    "arguments, fragment",
    [
        (["--model", "builtin:nope", "--input", "1x8x8"], "builtin:nope"),
        (["--model", "builtin:mlp", "--input", "8x"], "input spec"),
        (["--model", "builtin:mlp", "--input", "3x8x8", "--batch-size", "2"], "does not fit model MLP"),
        (["--model", "builtin:mlp", "--input", "1x8x8", "--memory", "lots"], "--memory"),
        (["--model", "builtin:mlp", "--input", "1x8x8", "--device", "rtx3050"], "rtx3050"),
        (["--model", "builtin:mlp", "--input", "1x8x8", "--checkpointing", "--batch-size", "2"], "no repeated blocks"),
        (["--model", "builtin:mlp", "--input", "1x8x8", "--batch-size", "0"], "batch size"),
        (["--model", "builtin:mlp"], "--input"),
    ],
)
def test_bad_input_exits_2_with_one_line(arguments, fragment):
    completed = _cli(*arguments, *([] if "--device" in arguments else ["--device", "cpu"]))
    assert completed.returncode == 2, completed.stderr
    assert fragment in completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1 and "Traceback" not in completed.stderr


@pytest.mark.slow
def test_7b_lora_is_planned_without_allocating_its_weights():
    """27 GB of fp32 weights, planned in a process that stays far below that (meta + fake tensors)."""
    completed = _cli(
        "--model",
        f"hf:{LLAMA_7B}",
        "--input",
        "tokens:32",
        "--batch-size",
        "1",
        "--lora-rank",
        "8",
        "--precision",
        "bf16-pure",
        "--device",
        "a100-80gb",
        "--json",
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert result["parameters"] > 6.7e9 and result["trainable_parameters"] < 0.01 * result["parameters"]
    assert result["breakdown"]["parameters"] >= 2 * 6.7e9  # bf16 base weights are counted, not allocated
    assert result["breakdown"]["optimizer"] < 0.01 * result["breakdown"]["parameters"]  # adapters only
    assert result["fits"] is True
    peak_rss_bytes = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    assert peak_rss_bytes < 4 * 2**30 < 0.2 * 4 * result["parameters"]


# ------------------------------------------------------------------------------------- pipelines


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_pipeline_table(tmp_path):
    pipeline = _write(
        tmp_path / "pipeline.yaml",
        """
name: small pipeline
device: cpu
memory: 64MiB
stages:
  - name: mlp-check
    model: builtin:mlp
    input: 1x8x8
    batch_size: 32
  - name: gpt-recommend
    model: builtin:tiny-gpt
    input: tokens:32
    effective_batch_size: 8
    precision: fp32
    samples: 100
    model_kwargs: {dim: 32, depth: 2, heads: 2, vocab_size: 64}
  - name: svm
    kind: cpu
    features: 512
    samples: 1000
""",
    )
    completed = _cli(str(pipeline), "--json")
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert result["device"] == "current-cpu" and result["budget_bytes"] == 64 * MiB
    check, recommend, svm = result["stages"]
    assert check["verdict"] == "fits" and check["micro_batch_size"] == 32 and check["plan"]["recommendation"] is None
    assert recommend["micro_batch_size"] * recommend["accumulation_steps"] == 8
    assert recommend["epoch_time_s"] == pytest.approx(13 * recommend["step_time_s"])  # ceil(100 / 8) steps
    assert svm["kind"] == "cpu" and svm["peak_bytes"] == 1000 * 512 * 8 + SVM_KERNEL_CACHE_BYTES
    assert result["fits"] is True


@pytest.mark.parametrize(
    "text, fragment",
    [
        (
            "stages:\n  - name: a\n    model: builtin:mlp\n    input: 1x8x8\n    batchsize: 4\n",
            "stages[0].batchsize: unknown key; did you mean 'batch_size'?",
        ),
        ("devise: cpu\nstages:\n  - name: a\n    kind: cpu\n", "devise: unknown key; did you mean 'device'?"),
        ("stages: []\n", "stages"),
        ("stages:\n  - name: a\n    model: builtin:mlp\n    input: [1, 8\n", "not valid YAML"),
        ("stages:\n  - name: a\n    precision: fp8\n    model: builtin:mlp\n    input: 1x8x8\n", "stages[0].precision"),
        ("stages:\n  - name: a\n    input: 1x8x8\n", "needs 'model' and 'input'"),
        (
            "stages:\n  - name: q\n    model: builtin:mlp\n    input: 1x8x8\n    quantize_base: nf4\n",
            "needs a LoRA rank",
        ),
        ("stages:\n  - name: broken\n    model: builtin:nope\n    input: 1x8x8\n", "stage 'broken'"),
    ],
)
def test_bad_pipeline_files_exit_2(tmp_path, text, fragment):
    pipeline = _write(tmp_path / "bad.yaml", text)
    completed = _cli(str(pipeline), "--device", "cpu")
    assert completed.returncode == 2, completed.stderr
    assert fragment in completed.stderr
    if "stage" not in fragment and "needs" not in fragment:
        assert str(pipeline) in completed.stderr  # the message names the file
    assert pipeline.read_text() == text  # nothing written over


def test_missing_pipeline_file_exits_2(tmp_path):
    completed = _cli(str(tmp_path / "missing.yaml"))
    assert completed.returncode == 2 and "missing.yaml does not exist" in completed.stderr


@pytest.mark.slow
def test_shipped_seed002_pipeline_runs():
    """The seed-002 study file plans: pre-training as training steps, extraction forward-only."""
    example = REPOSITORY / "examples" / "pipelines" / "seed002-rtx3050.yaml"
    completed = _cli(str(example), "--json", timeout=900)
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert result["device"] == "rtx3050-laptop-6gb"
    stages = {stage["name"]: stage for stage in result["stages"]}
    assert stages["vit-mim"]["kind"] == "train" and stages["vit-mim"]["micro_batch_size"] == 4
    for name in ("vit-mim", "vit-contrastive", "mim-features", "slice-features"):
        assert stages[name]["fits"] and stages[name]["peak_bytes"] <= 0.9 * stages[name]["budget_bytes"]
    for name in ("mim-features", "contrastive-features", "vit-pure-features", "slice-features"):
        assert stages[name]["kind"] == "extract" and stages[name]["optimizer"] is None
        assert stages[name]["plan"]["breakdown"]["gradients"] == stages[name]["plan"]["breakdown"]["optimizer"] == 0
    assert stages["classify"]["kind"] == "cpu"


def test_measure_matches_the_estimate_on_cpu():
    """--measure runs real steps here; on the CPU the engine's estimate equals the measured peak."""
    result = plan("builtin:digits-cnn", "1x8x8", batch_size=32, profile=get_profile("cpu"), measure=True)
    measured = result.measured
    assert measured["device"] == "cpu" and measured["batch_size"] == 32
    assert measured["peak_bytes"] == result.peak_bytes
    assert measured["step_time_s"] > 0 and measured["steps_timed"] == 3


def test_diffusion_directory_is_planned(tmp_path):
    """diffusion:DIR goes through the LoRA engineer's builder; frozen VAE/text encoder are counted, not trained."""
    pytest.importorskip("tightfit.models.diffusion")
    pytest.importorskip("diffusers")
    from tiny_diffusion import write_tiny_pipeline

    directory = write_tiny_pipeline(tmp_path / "sd")
    result = plan(
        f"diffusion:{directory}", "pixel_values=3x16x16,input_ids=tokens:77", batch_size=2, profile=_budget(2**30)
    )
    assert result.fits and 0 < result.trainable_parameters < result.parameters
    assert result.breakdown["gradients"] <= 4 * result.trainable_parameters < result.breakdown["parameters"]


def test_one_plan_entry_dispatches_on_the_request_kind():
    from tightfit.hardware.profiles import resolve_target
    from tightfit.plan import InferenceRequest, ModelRequest, plan
    from tightfit.plan.inference import InferencePlan
    from tightfit.plan.planner import PlanResult
    from tightfit.plan.planner import plan as plan_model

    options = {
        "batch_size": 32,
        "precision": "fp32",
        "optimizer": "adamw",
        "profile": resolve_target("rtx3050-laptop-6gb", None),
    }
    result = plan(ModelRequest("builtin:digits-cnn", "1x8x8", options))
    assert isinstance(result, PlanResult)
    assert result.to_dict()["breakdown"] == plan_model("builtin:digits-cnn", "1x8x8", **options).to_dict()["breakdown"]
    forward = plan(InferenceRequest("builtin:digits-cnn", "1x8x8", {"batch_size": 32, "profile": options["profile"]}))
    assert isinstance(forward, InferencePlan) and forward.breakdown.get("gradients", 0) == 0
    with pytest.raises(TypeError, match="not a plan request"):
        plan({"model": "builtin:digits-cnn"})
