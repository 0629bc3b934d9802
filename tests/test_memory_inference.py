"""Forward-only memory: estimate vs measurement, the largest batch, plan/batch-size --inference, pipelines."""

import json

import pytest
import torch

from tightfit.cli import main
from tightfit.memory.estimator import estimate_step
from tightfit.models.spec import build_model, make_batch_factory, parse_input_spec
from tightfit.plan.inference import estimate_forward, find_inference_batch_size, largest_batch, measure_forward


@pytest.mark.parametrize(
    "spec, shape, kwargs, precision",
    [
        ("builtin:digits-cnn", "1x8x8", {}, "fp32"),
        (
            "builtin:vit",
            "1x16x16",
            {"image_size": 16, "patch_size": 4, "in_channels": 1, "dim": 32, "depth": 2, "heads": 2},
            "bf16",
        ),
        ("builtin:vit3d", "1x16x16x16", {"image_size": 16, "patch_size": 8, "dim": 32, "depth": 1, "heads": 2}, "fp32"),
    ],
)
def test_forward_estimate_equals_measurement_on_cpu(spec, shape, kwargs, precision):
    torch.manual_seed(0)
    model = build_model(spec, **kwargs)
    factory = make_batch_factory(parse_input_spec(shape), model)
    estimated = estimate_forward(model, factory, batch_size=8, precision=precision)
    measured = measure_forward(model, factory, batch_size=8, precision=precision, device="cpu")
    assert estimated.peak_bytes == measured.peak_bytes
    assert estimated.breakdown["gradients"] == estimated.breakdown["optimizer"] == 0
    assert estimated.breakdown["parameters"] == sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    assert estimated.flops == measured.flops > 0
    assert model.training  # put back as it was


def test_forward_peak_is_far_below_the_training_step():
    model = build_model("builtin:small-cnn", num_classes=10, meta=True)
    factory = make_batch_factory(parse_input_spec("3x32x32"), model)
    forward = estimate_forward(model, factory, batch_size=16)
    training = estimate_step(model, factory, batch_size=16)
    assert forward.peak_bytes < 0.4 * training.peak_bytes


def test_largest_batch_is_the_boundary_and_the_search_confirms_it():
    model = build_model("builtin:digits-cnn")
    factory = make_batch_factory(parse_input_spec("1x8x8"), model)
    budget = 8 * 2**20
    batch, memory = largest_batch(model, factory, budget_bytes=budget, margin=0.1)
    assert memory.peak_bytes <= 0.9 * budget
    assert estimate_forward(model, factory, batch_size=batch + 1, count_flops=False).peak_bytes > 0.9 * budget
    search = find_inference_batch_size(model, factory, budget_bytes=budget, device="cpu", margin=0.1)
    assert search.batch_size == search.predicted_batch_size == batch
    assert [trial["fits"] for trial in search.trials] == [True, False]


def test_cli_plan_and_batch_size_inference(capsys):
    assert (
        main(
            [
                "plan",
                "--model",
                "builtin:digits-cnn",
                "--input",
                "1x8x8",
                "--inference",
                "--batch-size",
                "32",
                "--device",
                "cpu",
                "--json",
            ]
        )
        == 0
    )
    planned = json.loads(capsys.readouterr().out)
    assert planned["mode"] == "inference" and planned["batch_size"] == 32 and planned["breakdown"]["optimizer"] == 0
    assert (
        main(
            [
                "batch-size",
                "--model",
                "builtin:digits-cnn",
                "--input",
                "1x8x8",
                "--memory",
                "8MiB",
                "--inference",
                "--json",
            ]
        )
        == 0
    )
    searched = json.loads(capsys.readouterr().out)
    assert searched["mode"] == "inference" and searched["batch_size"] > 0
    assert main(["plan", "--model", "builtin:digits-cnn", "--input", "1x8x8", "--inference", "--optimizer", "sgd"]) == 2
    capsys.readouterr()
    assert (
        main(
            [
                "plan",
                "--model",
                "builtin:digits-cnn",
                "--input",
                "1x8x8",
                "--inference",
                "--samples",
                "1000",
                "--device",
                "rtx3050-laptop-6gb",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "FITS" in text and "forward only" in text and "for 1000 samples" in text
    assert (
        main(["batch-size", "--model", "builtin:digits-cnn", "--input", "1x8x8", "--memory", "8MiB", "--inference"])
        == 0
    )
    assert "largest forward batch" in capsys.readouterr().out


def test_pipeline_extract_stage_is_planned_forward_only(tmp_path):
    from tightfit.plan.pipeline import load_pipeline, plan_pipeline

    path = tmp_path / "pipeline.yaml"
    path.write_text(
        "device: rtx3050-laptop-6gb\nstages:\n"
        "  - {name: features, kind: extract, model: torchvision:resnet18, input: 3x64x64, batch_size: 32, samples: "
        "1000}\n"
        "  - {name: finetune, model: torchvision:resnet18, input: 3x64x64, batch_size: 32}\n"
    )
    result = plan_pipeline(load_pipeline(path))
    extract, training = result.stages
    assert extract.kind == "extract" and extract.optimizer is None and extract.plan["mode"] == "inference"
    assert extract.peak_bytes < training.peak_bytes
    assert extract.epoch_time_s is not None and extract.epoch_time_s > 0
