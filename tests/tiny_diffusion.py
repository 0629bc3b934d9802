"""A tiny random Stable Diffusion pipeline folder, written locally: the tests' stand-in for SD 1.5."""

import json
from pathlib import Path

import torch

from tightfit._optional import require
from tightfit.models.diffusion import SD15_NOISE_SCHEDULE, TEXT_CONTEXT_LENGTH


def write_tiny_pipeline(directory: str | Path, *, seed: int = 0, sample_size: int = 16) -> Path:
    """Write a tiny random Stable Diffusion pipeline directory (for tests and smoke runs).

    Same layout and component classes as SD 1.5 (UNet2DConditionModel, AutoencoderKL,
    CLIPTextModel, CLIPTokenizer, DDPMScheduler) at toy sizes, random weights, and a byte-level
    CLIP vocabulary written here, so nothing is downloaded.

    Args:
        directory: where to write (created; existing files of the same names are replaced).
        seed: seed of the random weights.
        sample_size: image side in pixels (latents are half of it: the tiny VAE downsamples 2x).

    Returns:
        The directory, loadable by :func:`build_diffusion_model` and ``StableDiffusionPipeline``.
    """
    diffusers = require("diffusers", extra="hf", purpose="diffusion fine-tuning")
    transformers = require("transformers", extra="hf", purpose="the diffusion text encoder")
    directory = Path(directory)
    torch.manual_seed(seed)
    cross_attention_dim = 32
    unet = diffusers.UNet2DConditionModel(
        sample_size=sample_size // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 32),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=sample_size,
    )
    tokenizer_dir = directory / "tokenizer"
    _write_byte_level_clip_vocabulary(tokenizer_dir)
    tokenizer = transformers.CLIPTokenizer(
        str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"), model_max_length=TEXT_CONTEXT_LENGTH
    )
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cross_attention_dim,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TEXT_CONTEXT_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = diffusers.DDPMScheduler(**SD15_NOISE_SCHEDULE)
    unet.save_pretrained(str(directory / "unet"))
    vae.save_pretrained(str(directory / "vae"))
    text_encoder.save_pretrained(str(directory / "text_encoder"))
    tokenizer.save_pretrained(str(tokenizer_dir))
    scheduler.save_pretrained(str(directory / "scheduler"))
    (directory / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": diffusers.__version__,
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "DDPMScheduler"],
                "safety_checker": [None, None],
                "feature_extractor": [None, None],
                "requires_safety_checker": False,
            },
            indent=2,
        )
        + "\n"
    )
    return directory


def _write_byte_level_clip_vocabulary(directory: Path) -> None:
    """A CLIP BPE vocabulary with no merges: every byte is a token (with and without ``</w>``)."""
    directory.mkdir(parents=True, exist_ok=True)
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    characters = [chr(byte) for byte in printable]
    extra = 0
    for byte in range(256):  # GPT-2's byte-to-unicode map: unprintable bytes move above 255
        if byte not in printable:
            characters.append(chr(256 + extra))
            extra += 1
    tokens = characters + [character + "</w>" for character in characters]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
