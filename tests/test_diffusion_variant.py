"""Diffusion gaps from seed-003: fp16 variant weight folders load; a LoRA run on one checkpoints its
adapters only, draws PNGs through tightfit generate, and merges into a folder plain diffusers loads."""

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from tightfit.cli import main  # noqa: E402
from tightfit.models.diffusion import build_diffusion_model, weights_variant  # noqa: E402
from tiny_diffusion import write_tiny_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def variant_pipeline(tmp_path_factory) -> Path:
    """A tiny pipeline saved the way ``revision: fp16`` leaves it: only ``*.fp16.safetensors``."""
    directory = write_tiny_pipeline(tmp_path_factory.mktemp("variant") / "sd", sample_size=16)
    for component in ("unet", "vae", "text_encoder"):
        for weights in (directory / component).glob("*.safetensors"):
            weights.rename(weights.with_name(weights.stem + ".fp16.safetensors"))
    return directory


def test_variant_only_folders_load_with_their_weights(variant_pipeline, tmp_path):
    from safetensors.torch import load_file

    assert weights_variant(variant_pipeline / "unet") == "fp16"
    module = build_diffusion_model(variant_pipeline)
    saved = load_file(str(variant_pipeline / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    name = next(iter(saved))
    torch.testing.assert_close(module.unet.state_dict()[name], saved[name].float())
    assert build_diffusion_model(variant_pipeline, variant="fp16").unet is not None
    with pytest.raises(Exception, match="no 'bf16' variant"):
        build_diffusion_model(variant_pipeline, variant="bf16")


def test_generate_draws_pngs_and_never_overwrites(variant_pipeline, tmp_path, capsys):
    output = tmp_path / "images"
    command = [
        "generate",
        str(variant_pipeline),
        "--prompt",
        "a red shoe",
        "--steps",
        "2",
        "--num-images",
        "2",
        "--output",
        str(output),
    ]
    assert main(command) == 0
    pngs = sorted(path.name for path in output.glob("*.png"))
    assert pngs == ["image-0000.png", "image-0001.png"]
    before = (output / "image-0000.png").read_bytes()
    capsys.readouterr()
    assert main(command) == 2
    assert "already exists" in capsys.readouterr().err
    assert (output / "image-0000.png").read_bytes() == before


def test_lora_run_on_a_variant_folder_checkpoints_adapters_and_merges_for_plain_diffusers(
    variant_pipeline, tmp_path, capsys
):
    from diffusers import StableDiffusionPipeline
    from PIL import Image
    from safetensors import safe_open

    from tightfit.training.trainer import Trainer

    data = tmp_path / "data" / "train"
    (data / "images").mkdir(parents=True)
    for index, colour in enumerate(((200, 0, 0), (0, 0, 200))):
        Image.new("RGB", (16, 16), colour).save(data / "images" / f"{index}.png")
    (data / "captions.json").write_text('{"0.png": "a red shoe", "1.png": "a blue shoe"}')
    run_dir = tmp_path / "run"
    config = {
        "model": f"diffusion:{variant_pipeline}",
        "model_options": {"resolution": 16},
        "data": {
            "source": "captioned-images",
            "path": str(tmp_path / "data"),
            "tokenizer": str(variant_pipeline),
            "image_size": 16,
            "val_fraction": 0.0,
            "test_fraction": 0.0,
        },
        "lora": {"rank": 4},
        "batch": {"micro_batch_size": 2},
        "max_steps": 1,
        "epochs": 1,
        "device": "cpu",
        "precision": "fp32",
        "run_dir": str(run_dir),
        "logging": {"console": False, "tensorboard": False},
        "monitor": {"enabled": False},
    }
    trainer = Trainer(config)
    trainer.fit()
    checkpoint = run_dir / "checkpoints" / "last" / "model.safetensors"
    with safe_open(str(checkpoint), framework="pt") as handle:
        assert handle.metadata()["weights"] == "adapters-only"
        assert all("lora_" in key for key in handle.keys())
    unet_bytes = sum(p.numel() * p.element_size() for p in trainer.model.get_base_model().unet.parameters())
    assert checkpoint.stat().st_size < unet_bytes / 5

    assert (
        main(
            [
                "generate",
                str(run_dir),
                "--prompt",
                "a red shoe",
                "--steps",
                "2",
                "--output",
                str(tmp_path / "out"),
                "--json",
            ]
        )
        == 0
    )
    assert (tmp_path / "out" / "image-0000.png").is_file()
    capsys.readouterr()
    assert main(["lora", "merge", str(run_dir), "--output", str(tmp_path / "merged")]) == 0
    pipeline = StableDiffusionPipeline.from_pretrained(str(tmp_path / "merged"), safety_checker=None)
    assert pipeline.unet is not None and pipeline.vae is not None
