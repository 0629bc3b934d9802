"""tightfit plan CONFIG.yaml plans the run tightfit train CONFIG.yaml would do; the memory tracker
counts a torchao int8 weight at its int8 size."""

import json

import pytest
from torch import nn

pytest.importorskip("peft")
pytest.importorskip("torchao")

from tightfit.cli import main  # noqa: E402
from tightfit.config import load_config  # noqa: E402


def test_plan_of_a_recipe_plans_its_model_batch_and_lora(capsys):
    from tightfit.models.lora import apply_lora
    from tightfit.models.spec import build_model

    assert (
        main(["plan", "recipes/lora-causal-lm.yaml", "batch.micro_batch_size=2", "--device", "m1-16gb", "--json"]) == 0
    )
    result = json.loads(capsys.readouterr().out)
    config = load_config("recipes/lora-causal-lm.yaml")
    trained = apply_lora(
        build_model(config.model), config.lora.model_copy(update={"quantize_base": None}), verbose=False
    )
    assert result["trainable_parameters"] == trained.lora_summary.trainable_parameters  # the recipe's targets, not auto
    assert result["batch_size"] == 2 and result["input"] == "tokens:128"
    assert any("int8 base" in note for note in result["notes"])  # the recipe's int8 base, counted as such


def test_plan_refuses_overrides_on_a_pipeline_and_unknown_keys(capsys):
    assert main(["plan", "examples/pipelines/seed002-rtx3050.yaml", "epochs=2"]) == 2
    assert "pipeline" in capsys.readouterr().err
    assert main(["plan", "recipes/lora-causal-lm.yaml", "lora.rnak=4"]) == 2
    assert "did you mean 'rank'" in capsys.readouterr().err


def test_tracker_counts_an_int8_weight_at_its_int8_size():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from tightfit.memory.tracker import MemoryTracker

    model = nn.Sequential(nn.Linear(256, 128, bias=False))
    quantize_(model, Int8WeightOnlyConfig())
    with MemoryTracker(model) as tracker:
        pass
    parameter_bytes = tracker.breakdown["parameters"]
    assert 256 * 128 <= parameter_bytes <= 256 * 128 + 128 * 4 * 3  # one byte a weight + per-row scales


def test_every_recipe_header_names_itself_and_its_plan_commands_parse():
    import re
    import shlex
    from pathlib import Path

    from tightfit.cli import build_parser

    parser = build_parser()
    for recipe in sorted(Path("recipes").glob("*.yaml")):
        lines = recipe.read_text().splitlines()
        assert re.match(rf"# tightfit (train|compress) .*{re.escape(str(recipe))}", lines[0]), recipe
        if lines[0].startswith("# tightfit train"):
            load_config(recipe)  # every key valid
        for line in lines:
            if "tightfit plan " in line:
                command = shlex.split(line.split("tightfit ", 1)[1].split("(")[0])
                args = parser.parse_args(command)
                assert args.items and args.items[0] == str(recipe), line  # plans this recipe, not a stand-in


def _plan_json(capsys, *args) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    result.pop("seconds")
    result["notes"] = [note for note in result["notes"] if not note.startswith("estimated in")]
    return result


def test_plan_answers_for_the_target_whatever_the_planning_host_has(capsys, monkeypatch):
    import torch

    import tightfit.models.nf4 as nf4

    args = [
        "recipes/lora-causal-lm.yaml",
        "precision=auto",
        "checkpointing=auto",
        "lora.quantize_base=nf4",
        "--device",
        "rtx3050-laptop-6gb",
    ]
    # a CPU laptop without bitsandbytes plans for the RTX 3050 ...
    with monkeypatch.context() as patched:
        patched.setattr(torch.cuda, "is_available", lambda: False)
        patched.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
        patched.setattr(nf4, "is_available", lambda name: name != "bitsandbytes")
        on_cpu_host = _plan_json(capsys, *args)
    # ... and the answer is the one a CUDA host with bitsandbytes gives
    with monkeypatch.context() as patched:
        patched.setattr(torch.cuda, "is_available", lambda: True)
        patched.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        on_cuda_host = _plan_json(capsys, *args)
    assert on_cpu_host == on_cuda_host
    resolved = on_cpu_host["resolved"]
    assert resolved["precision"]["value"] == "bf16"  # the profile says the RTX 3050 runs bf16
    assert resolved["checkpointing"]["value"] is True
    assert resolved["base"] == {"value": "nf4", "backend": "bitsandbytes", "reason": resolved["base"]["reason"]}
    overhead_notes = [note for note in on_cpu_host["notes"] if note.startswith("device overhead")]
    assert len(overhead_notes) == 1 and "on the quantized peak" in overhead_notes[0]  # not the 16-bit estimate's


def test_plan_names_the_nf4_backend_for_an_m1_and_refuses_adam8bit_there(capsys):
    result = _plan_json(capsys, "recipes/lora-causal-lm.yaml", "lora.quantize_base=nf4", "--device", "m1-16gb")
    assert result["resolved"]["base"]["value"] == "nf4" and result["resolved"]["base"]["backend"]
    assert main(["plan", "recipes/lora-causal-lm.yaml", "optimizer.name=adam8bit", "--device", "m1-16gb"]) == 2
    error = capsys.readouterr().err
    assert "adam8bit" in error and "mps" in error and len(error.strip().splitlines()) == 1
