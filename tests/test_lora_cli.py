"""LoRA in the trainer and `tightfit lora info/merge`: adapters saved, merged, reloaded with the same outputs."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from tightfit.cli import main  # noqa: E402
from tightfit.runs.model import load_lora_run, merge_run  # noqa: E402


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> tuple[Path, dict, torch.nn.Module]:
    from tightfit.training.trainer import Trainer

    run_dir = tmp_path_factory.mktemp("lora-run") / "run"
    config = {
        "model": "builtin:digits-cnn",
        "data": {"source": "digits", "limit": 300},
        "lora": {"rank": 4, "alpha": 8},
        "optimizer": {"lr": 0.01},
        "batch": {"micro_batch_size": 32},
        "epochs": 2,
        "device": "cpu",
        "precision": "fp32",
        "run_dir": str(run_dir),
        "logging": {"progress": False, "tensorboard": False},
        "monitor": {"enabled": False},
    }
    torch.manual_seed(0)
    trainer = Trainer(config)
    summary = trainer.fit()
    return run_dir, summary, trainer.model.eval()


def test_trainer_trains_only_adapters_and_saves_them(lora_run):
    run_dir, summary, model = lora_run
    assert summary["steps"] > 0
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or "modules_to_save" in name for name in trainable)
    assert (run_dir / "adapters" / "adapter_model.safetensors").is_file()
    assert (run_dir / "adapters" / "adapter_config.json").is_file()


def test_info_reports_the_adapters(lora_run, capsys):
    run_dir, _, model = lora_run
    assert main(["lora", "info", str(run_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rank"] == 4 and info["alpha"] == 8
    assert info["base_model"] == "builtin:digits-cnn"
    assert info["trainable_parameters"] == model.lora_summary.trainable_parameters
    assert info["adapter_bytes"] == (run_dir / "adapters" / "adapter_model.safetensors").stat().st_size
    assert main(["lora", "info", str(run_dir)]) == 0
    assert "rank / alpha    4 / 8" in capsys.readouterr().out


def test_merge_writes_a_plain_model_with_the_same_outputs(lora_run, tmp_path, capsys):
    from tightfit.config import load_config
    from tightfit.models.spec import build_model
    from tightfit.runs.checkpoint import load_weights

    run_dir, _, trained = lora_run
    inputs = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        expected = trained(inputs)
        torch.testing.assert_close(load_lora_run(run_dir)(inputs), expected)

    output = tmp_path / "merged"
    assert main(["lora", "merge", str(run_dir), "--output", str(output), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kind"] == "state_dict" and "model.safetensors" in result["files"]
    # the merged folder rebuilds without PEFT: config.yaml (no lora) + weights
    config = load_config(str(output / "config.yaml"), [])
    assert config.lora is None
    plain = build_model(config.model, num_classes=10)
    load_weights(plain, output / "model.safetensors")
    assert not any("lora" in name for name, _ in plain.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(inputs), expected, atol=1e-5, rtol=1e-4)


def test_merge_refuses_to_overwrite_and_names_missing_adapters(lora_run, tmp_path, capsys):
    run_dir, _, _ = lora_run
    output = tmp_path / "taken"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    assert main(["lora", "merge", str(run_dir), "--output", str(output)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (output / "keep.txt").read_text() == "mine"
    assert main(["lora", "info", str(tmp_path / "nowhere")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert main(["lora", "merge", str(tmp_path)]) == 2
    assert "no LoRA adapters" in capsys.readouterr().err
    assert merge_run(run_dir, output, force=True)["output"] == str(output)
