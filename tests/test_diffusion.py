"""Diffusion LoRA: a tiny random SD pipeline built offline, trained end to end through the trainer."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from tightfit.errors import SpecError  # noqa: E402
from tightfit.models.diffusion import (  # noqa: E402
    build_diffusion_model,
    find_diffusion_module,
)
from tightfit.models.lora import LoRAConfig, apply_lora  # noqa: E402
from tiny_diffusion import write_tiny_pipeline  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SD15_UNET = REPO / "src" / "tightfit" / "configs" / "sd15-unet"


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipeline", sample_size=16)


@pytest.fixture(scope="module")
def captioned_images(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("shoes")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 2)):
        images = root / split / "images"
        images.mkdir(parents=True)
        captions = {}
        for index in range(count):
            colour = ["red", "blue"][index % 2]
            pixels = np.zeros((16, 16, 3), np.uint8)
            pixels[..., 0 if colour == "red" else 2] = 200
            pixels += rng.integers(0, 40, pixels.shape, dtype=np.uint8)
            Image.fromarray(pixels).save(images / f"{index:03d}.png")
            captions[f"{index:03d}.png"] = f"a {colour} shoe"
        (root / split / "captions.json").write_text(json.dumps(captions))
    return root


def test_loss_is_noise_prediction_mse_and_encoders_are_frozen(pipeline_dir):
    torch.manual_seed(0)
    module = build_diffusion_model(pipeline_dir)
    assert not any(p.requires_grad for p in module.vae.parameters())
    assert not any(p.requires_grad for p in module.text_encoder.parameters())
    batch = module.example_batch(2)
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and batch["input_ids"].shape == (2, 77)

    output = module(**batch)
    assert output.loss.ndim == 0 and output.sample.shape == (2, 4, 8, 8)
    # the loss is the MSE between the UNet's prediction and the drawn noise: redo it by hand
    torch.manual_seed(1)
    latents = module.encode_images(batch["pixel_values"])
    context = module.encode_text(batch["input_ids"])
    torch.manual_seed(2)
    expected = module(latents=latents, encoder_hidden_states=context)
    torch.manual_seed(2)
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, 1000, (2,))
    noisy = module.noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = module.unet(noisy, timesteps, context).sample
    torch.testing.assert_close(expected.loss, torch.nn.functional.mse_loss(prediction, noise))

    module.train()
    assert not module.vae.training and not module.text_encoder.training


def test_lora_targets_only_the_unet_attention(pipeline_dir):
    model = apply_lora(build_diffusion_model(pipeline_dir), LoRAConfig(rank=8, alpha=16), verbose=False)
    targets = model.lora_summary.target_modules
    assert targets and all(name.startswith("unet.") for name in targets)
    assert {name.rsplit(".", 1)[-1] for name in targets} <= {"to_q", "to_k", "to_v", "0"}
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name and ".unet." in name for name in trainable)


def test_recipe_trains_end_to_end_with_validation_images(pipeline_dir, captioned_images, tmp_path):
    from tightfit.config import load_config
    from tightfit.training.trainer import Trainer

    recipe = REPO / "recipes" / "lora-diffusion.yaml"
    first_line = recipe.read_text().splitlines()[0]
    assert first_line.startswith("# tightfit train recipes/lora-diffusion.yaml")
    run_dir = tmp_path / "run"
    config = load_config(
        str(recipe),
        [
            f"model=diffusion:{pipeline_dir}",
            f"data.path={captioned_images}",
            f"data.tokenizer={pipeline_dir}",
            "data.image_size=16",
            f"run_dir={run_dir}",
            "max_steps=2",
            "batch.micro_batch_size=2",
            "batch.accumulation_steps=2",
            "batch.effective_batch_size=4",
            "schedule.warmup_steps=1",
            "checkpoint.every_n_steps=1",
            "model_options.validation_every_n_steps=1",
            "model_options.validation_inference_steps=2",
            "model_options.resolution=16",
            "precision=fp32",
            "device=cpu",
            "logging.progress=false",
            "monitor.enabled=false",
        ],
    )
    assert config.lora.rank == 8 and config.lora.alpha == 16
    trainer = Trainer(config)
    trainer.setup()
    module = find_diffusion_module(trainer.model)
    unet_before = {n: p.detach().clone() for n, p in module.unet.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in module.unet.named_parameters() if "lora_B" in n}
    summary = trainer.fit()

    assert summary["steps"] == 2
    assert (run_dir / "adapters" / "adapter_model.safetensors").is_file()
    pngs = sorted(p.name for p in (run_dir / "validation").glob("*.png"))
    assert pngs == ["step-000001-0.png", "step-000001-1.png", "step-000002-0.png", "step-000002-1.png"]
    assert list((run_dir / "tensorboard").glob("events.*"))
    for name, parameter in module.unet.named_parameters():
        if name in unet_before:
            assert torch.equal(parameter, unet_before[name]), f"frozen {name} changed"
    assert any(not torch.equal(p, lora_before[n]) for n, p in module.unet.named_parameters() if n in lora_before)

    # merged: a plain diffusers pipeline folder whose UNet predicts what the trained LoRA UNet does
    from diffusers import UNet2DConditionModel

    from tightfit.runs.model import merge_run

    result = merge_run(run_dir)
    merged_dir = Path(result["output"])
    assert result["kind"] == "diffusers pipeline"
    assert {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= {
        p.name for p in merged_dir.iterdir()
    }
    merged_unet = UNet2DConditionModel.from_pretrained(str(merged_dir / "unet")).eval()
    torch.manual_seed(3)
    sample, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    module.eval()
    with torch.no_grad():
        expected = module.unet(sample, 10, context).sample
        torch.testing.assert_close(merged_unet(sample, 10, context).sample, expected, atol=1e-4, rtol=1e-4)


def test_sd15_unet_config_builds_on_meta_with_the_published_size():
    module = build_diffusion_model(SD15_UNET, meta=True)
    assert module.vae is None and module.text_encoder is None
    assert all(p.is_meta for p in module.parameters())
    assert sum(p.numel() for p in module.parameters()) == 859_520_964  # SD 1.5 UNet
    batch = module.example_batch(2, "meta", resolution=512)
    assert batch["latents"].shape == (2, 4, 64, 64) and batch["encoder_hidden_states"].shape == (2, 77, 768)
    lora = apply_lora(module, LoRAConfig(rank=8, alpha=16), verbose=False)
    # 16 transformer blocks x 2 attentions x (q, k, v, out): rank-8 adapters
    assert len(lora.lora_summary.target_modules) == 128
    assert lora.lora_summary.trainable_parameters == 1_594_368
    assert lora(**batch).loss.is_meta


def test_bad_directories_are_named(tmp_path):
    with pytest.raises(SpecError, match="no such directory"):
        build_diffusion_model(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(SpecError, match="not a Stable Diffusion directory"):
        build_diffusion_model(tmp_path)
    (tmp_path / "unet").mkdir()
    with pytest.raises(SpecError, match="no vae/ folder"):
        build_diffusion_model(tmp_path)
