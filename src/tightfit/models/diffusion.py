"""Stable Diffusion fine-tuning as an ordinary model: ``forward(**batch).loss`` is the noise-prediction loss.

:func:`build_diffusion_model` wraps a local diffusers Stable Diffusion directory (``unet/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, the layout ``save_pretrained`` writes)
in a :class:`DiffusionTrainingModule`. One forward pass is one step of the latent-diffusion training
objective (Rombach et al. 2022), the same as diffusers' ``train_text_to_image_lora.py``:

1. encode the images with the frozen VAE: ``latents = vae.encode(pixels).sample() * scaling_factor``;
2. encode the captions with the frozen CLIP text encoder;
3. draw noise and a timestep per sample, and noise the latents with the scheduler;
4. predict with the UNet and return the MSE against the noise (or against the velocity when the
   scheduler is configured for ``v_prediction``).

So the trainer's single training step (``tightfit.step.loss``: the model's own ``.loss``)
trains it, LoRA adapts only the UNet's attention (``to_q``, ``to_k``, ``to_v``, ``to_out.0``), and
the memory engine plans it like any model.

A directory holding only a UNet ``config.json`` (such as the shipped ``configs/sd15-unet``) gives
a UNet-only module whose batches carry ``latents`` and ``encoder_hidden_states`` directly: that is
how the SD 1.5 UNet is planned at 512x512 (latents 4x64x64, text context 77x768) on the meta device.

The memory helpers of seed-003 are settings of :func:`build_diffusion_model`: ``attention``
(``sdpa``, the fused kernel, or ``sliced``, computing attention a head group at a time),
``vae_tiling`` (encode large images tile by tile), ``cpu_offload`` (the frozen VAE and text
encoder stay in CPU memory; only the UNet goes to the accelerator) and ``gradient_checkpointing``.
"""

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from tightfit._optional import require
from tightfit.errors import SpecError

# The DDPM noise schedule Stable Diffusion 1.x was trained with (its scheduler_config.json);
# used by a UNet-only directory, which has no scheduler of its own.
SD15_NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "steps_offset": 1,
}
TEXT_CONTEXT_LENGTH = 77  # CLIP's context: every SD caption is padded to 77 tokens
LATENT_DOWNSCALE = 8  # the SD VAE maps 512x512 pixels to 64x64 latents


@dataclass
class DiffusionOutput:
    """What a training forward returns: ``loss`` for the trainer, ``sample`` the UNet prediction."""

    loss: torch.Tensor
    sample: torch.Tensor


class DiffusionTrainingModule(nn.Module):
    """A UNet trained to predict noise, with its frozen VAE, text encoder and noise scheduler.

    Build it with :func:`build_diffusion_model`. ``vae`` and ``text_encoder`` are ``None`` for a
    UNet-only module.
    """

    def __init__(
        self,
        unet: nn.Module,
        noise_scheduler: Any,
        vae: nn.Module | None = None,
        text_encoder: nn.Module | None = None,
        tokenizer: Any = None,
        *,
        cpu_offload: bool = False,
        source: str | None = None,
        validation: "ValidationSettings | None" = None,
    ):
        super().__init__()
        self.validation = validation
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.noise_scheduler = noise_scheduler
        self.cpu_offload = cpu_offload
        self.source = source
        for frozen in (vae, text_encoder):
            if frozen is not None:
                frozen.requires_grad_(False)
                frozen.eval()

    # -- what LoRA and the planner ask of a model -------------------------------------------
    def lora_target_modules(self) -> list[str]:
        """The UNet's attention projections; the frozen VAE and text encoder are left alone."""
        suffixes = (".to_q", ".to_k", ".to_v", ".to_out.0")
        return [
            f"unet.{name}"
            for name, module in self.unet.named_modules()
            if isinstance(module, nn.Linear) and name.endswith(suffixes)
        ]

    def lora_modules_to_save(self) -> list[str]:
        return []  # no new task head: the UNet's output is already noise

    def example_batch(self, batch_size: int, device: torch.device | str = "cpu", resolution: int | None = None) -> dict:
        """A random batch of the right shapes (for planning and smoke runs).

        A full pipeline gets ``pixel_values`` (``batch x 3 x resolution x resolution`` in
        ``[-1, 1]``) and ``input_ids`` (``batch x 77``); a UNet-only module gets ``latents`` and
        ``encoder_hidden_states`` (``batch x 77 x cross_attention_dim``).
        """
        config = self.unet.config
        latent_size = (resolution // LATENT_DOWNSCALE) if resolution else config.sample_size
        if self.vae is None or self.text_encoder is None:
            return {
                "latents": torch.randn(batch_size, config.in_channels, latent_size, latent_size, device=device),
                "encoder_hidden_states": torch.randn(
                    batch_size,
                    TEXT_CONTEXT_LENGTH if resolution else self._context_length(),
                    config.cross_attention_dim,
                    device=device,
                ),
            }
        pixels = latent_size * self.vae_scale_factor
        vocab_size = self.text_encoder.config.vocab_size
        return {
            "pixel_values": torch.rand(batch_size, 3, pixels, pixels, device=device) * 2 - 1,
            "input_ids": torch.randint(0, vocab_size, (batch_size, self._context_length()), device=device),
        }

    def _context_length(self) -> int:
        if self.tokenizer is not None:
            return int(self.tokenizer.model_max_length)
        return TEXT_CONTEXT_LENGTH

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else LATENT_DOWNSCALE

    def training_callbacks(self) -> list:
        """Callbacks this model asks the trainer for: validation images when prompts are set."""
        if self.validation is None or not self.validation.prompts:
            return []
        return [DiffusionValidationImages(self.validation)]

    # -- devices ----------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        # With cpu_offload only the UNet follows .to()/.cuda()/.half(): the frozen encoders stay
        # on the CPU in fp32, where they cost host memory instead of accelerator memory.
        if self.cpu_offload:
            self.unet._apply(fn, recurse)
            return self
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (self.vae, self.text_encoder):
            if frozen is not None:
                frozen.eval()  # frozen encoders never use dropout or update statistics
        return self

    # -- the training objective -------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Latents of ``pixel_values`` (in ``[-1, 1]``) through the frozen VAE, scaled for the UNet."""
        vae_device = next(self.vae.parameters()).device
        vae_dtype = next(self.vae.parameters()).dtype
        posterior = self.vae.encode(pixel_values.to(vae_device, vae_dtype)).latent_dist
        return posterior.sample() * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Per-token caption embeddings from the frozen text encoder (the UNet's cross-attention context)."""
        encoder_device = next(self.text_encoder.parameters()).device
        return self.text_encoder(input_ids.to(encoder_device))[0]

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        **unused: Any,
    ) -> DiffusionOutput:
        """One step of the noise-prediction objective; see the module doc.

        Args:
            pixel_values: images in ``[-1, 1]`` (``batch x 3 x H x W``), or give ``latents``.
            input_ids: tokenized captions (``batch x 77``), or give ``encoder_hidden_states``.
            latents: already-encoded, already-scaled latents.
            encoder_hidden_states: already-encoded captions.
            unused: other batch keys (``attention_mask``, ``labels``...) are ignored.

        Returns:
            :class:`DiffusionOutput` with the MSE loss in fp32.
        """
        unet_parameter = next(self.unet.parameters())
        device = unet_parameter.device
        if latents is None:
            if pixel_values is None or self.vae is None:
                raise ValueError("a diffusion batch needs pixel_values (with a VAE) or latents")
            latents = self.encode_images(pixel_values)
        if encoder_hidden_states is None:
            if input_ids is None or self.text_encoder is None:
                raise ValueError("a diffusion batch needs input_ids (with a text encoder) or encoder_hidden_states")
            encoder_hidden_states = self.encode_text(input_ids)
        latents = latents.to(device)
        encoder_hidden_states = encoder_hidden_states.to(device)

        noise = torch.randn_like(latents)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device
        )
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        prediction = self.unet(noisy_latents, timesteps, encoder_hidden_states).sample
        loss = F.mse_loss(prediction.float(), target.float())
        return DiffusionOutput(loss=loss, sample=prediction)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        *,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        seed: int = 0,
        resolution: int | None = None,
    ) -> torch.Tensor:
        """Images for ``prompts`` with the current UNet (adapters included): DDIM sampling with
        classifier-free guidance, decoded by the VAE.

        The loop is written out rather than borrowed from ``StableDiffusionPipeline`` so that it
        follows this module's device placement (``cpu_offload`` keeps the encoders on the CPU).

        Returns:
            ``len(prompts) x 3 x H x W`` float images in ``[0, 1]``, on the CPU.
        """
        if self.vae is None or self.text_encoder is None or self.tokenizer is None:
            raise ValueError("image generation needs a full pipeline (VAE, text encoder, tokenizer)")
        diffusers = require("diffusers", extra="hf", purpose="diffusion sampling")
        unet_parameter = next(self.unet.parameters())
        device, dtype = unet_parameter.device, unet_parameter.dtype
        scheduler = diffusers.DDIMScheduler.from_config(self.noise_scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=device)

        def tokens(texts: list[str]) -> torch.Tensor:
            return self.tokenizer(
                texts, padding="max_length", max_length=self._context_length(), truncation=True, return_tensors="pt"
            ).input_ids

        # unconditional first, then the prompts: one UNet call per step for both halves
        context = torch.cat([self.encode_text(tokens([""] * len(prompts))), self.encode_text(tokens(prompts))])
        context = context.to(device, dtype)
        latent_size = resolution // self.vae_scale_factor if resolution else self.unet.config.sample_size
        generator = torch.Generator("cpu").manual_seed(seed)
        latents = (
            torch.randn((len(prompts), self.unet.config.in_channels, latent_size, latent_size), generator=generator).to(
                device, dtype
            )
            * scheduler.init_noise_sigma
        )
        for timestep in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents, latents]), timestep)
            unconditional, conditional = self.unet(model_input, timestep, context).sample.chunk(2)
            noise = unconditional + guidance_scale * (conditional - unconditional)
            latents = scheduler.step(noise, timestep, latents).prev_sample
        vae_parameter = next(self.vae.parameters())
        latents = latents.to(vae_parameter.device, vae_parameter.dtype) / self.vae.config.scaling_factor
        images = self.vae.decode(latents).sample
        return ((images.float().clamp(-1, 1) + 1) / 2).cpu()


@dataclass
class ValidationSettings:
    """When and how the validation images are drawn (``model_options`` of the recipe)."""

    prompts: list[str]
    every_n_steps: int = 500
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 0
    resolution: int | None = None


class DiffusionValidationImages:
    """Trainer callback: every ``every_n_steps`` optimizer steps (and at the end), draw the
    validation prompts with the current adapters; PNGs go to ``RUN_DIR/validation/`` and images to
    TensorBoard (``validation/N``). The seed is fixed, so successive images show what training changed.
    """

    def __init__(self, settings: ValidationSettings):
        self.settings = settings
        self.last_step: int | None = None

    def on_step_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        if trainer.global_step % self.settings.every_n_steps == 0:
            self.render(trainer)

    def on_fit_end(self, trainer: Any, summary: dict[str, Any]) -> None:
        if self.last_step != trainer.global_step:
            self.render(trainer)

    def render(self, trainer: Any) -> list[Path]:
        """Draw and write the images for the trainer's current step; returns the PNG paths."""
        from PIL import Image

        step = trainer.global_step
        self.last_step = step
        if not getattr(getattr(trainer, "process", None), "is_main", True):
            return []
        module = find_diffusion_module(trainer.model)
        was_training = module.training
        module.eval()
        try:
            images = module.generate(
                self.settings.prompts,
                num_inference_steps=self.settings.num_inference_steps,
                guidance_scale=self.settings.guidance_scale,
                seed=self.settings.seed,
                resolution=self.settings.resolution,
            )
        finally:
            module.train(was_training)
        directory = Path(trainer.run_dir) / "validation"
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for index, image in enumerate(images):
            path = directory / f"step-{step:06d}-{index}.png"
            pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            Image.fromarray(pixels).save(path)
            paths.append(path)
            for logger in getattr(trainer, "loggers", []):
                writer = getattr(logger, "writer", None)  # TensorBoard's SummaryWriter
                if writer is not None and hasattr(writer, "add_image"):
                    writer.add_image(f"validation/{index}", image, global_step=step)
        return paths


def find_diffusion_module(model: nn.Module) -> DiffusionTrainingModule:
    """The :class:`DiffusionTrainingModule` inside a PEFT/DDP wrapper (or the model itself)."""
    for module in model.modules():
        if isinstance(module, DiffusionTrainingModule):
            return module
    raise TypeError(f"{type(model).__name__} holds no DiffusionTrainingModule")


def _has_weights(directory: Path) -> bool:
    return any(directory.glob("*.safetensors")) or any(directory.glob("*.bin"))


def weights_variant(directory: Path, requested: str | None = None) -> str | None:
    """The weight variant to load from a component folder: ``requested`` when given, else
    ``fp16`` (or another) when the folder holds only variant files
    (``diffusion_pytorch_model.fp16.safetensors``, what ``revision: fp16`` downloads), else None.

    Raises:
        SpecError: ``requested`` names a variant the folder does not have.
    """
    files = [path for pattern in ("*.safetensors", "*.bin") for path in directory.glob(pattern)]
    variants = {
        path.name.split(".")[-2]
        for path in files
        if path.name.count(".") >= 2 and not path.name.endswith(".index.json")
    }
    plain = [path for path in files if path.name.count(".") == 1]
    if requested is not None:
        if files and requested not in variants:
            raise SpecError(
                f"{directory}: no {requested!r} variant weights (found: "
                f"{', '.join(sorted(variants)) or 'plain weights only'})"
            )
        return requested if files else None
    if plain or not variants:
        return None
    return "fp16" if "fp16" in variants else sorted(variants)[0]


def _load(component_class, directory: Path, meta: bool, variant: str | None = None):
    """A diffusers/transformers component: its weights when present, else random init from config.

    Raises:
        SpecError: a damaged or unsafe file (a ``.bin`` holding Python objects is refused by the
            libraries' ``weights_only`` load, never run), in one line naming the folder.
    """
    try:
        return _load_component(component_class, directory, meta, variant)
    except (OSError, ValueError, KeyError, pickle.UnpicklingError) as error:
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SpecError(f"diffusion component {directory}: cannot be loaded safely ({text})") from None


def _load_component(component_class, directory: Path, meta: bool, variant: str | None = None):
    if _has_weights(directory) and not meta:
        found = weights_variant(directory, variant)
        return component_class.from_pretrained(str(directory), **({"variant": found} if found else {}))
    if hasattr(component_class, "from_config") and hasattr(component_class, "load_config"):
        config = component_class.load_config(str(directory))  # diffusers models
        if meta:
            with torch.device("meta"):
                return component_class.from_config(config)
        return component_class.from_config(config)
    config = component_class.config_class.from_pretrained(str(directory))  # transformers models
    if meta:
        with torch.device("meta"):
            return component_class(config)
    return component_class(config)


def build_diffusion_model(
    directory: str | Path,
    *,
    meta: bool = False,
    attention: Literal["sdpa", "sliced", "default"] = "sdpa",
    vae_tiling: bool = False,
    cpu_offload: bool = False,
    gradient_checkpointing: bool = False,
    prediction_type: Literal["epsilon", "v_prediction"] | None = None,
    validation_prompts: list[str] | None = None,
    validation_every_n_steps: int = 500,
    validation_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    validation_seed: int = 0,
    resolution: int | None = None,
    variant: str | None = None,
    **unused: Any,
) -> DiffusionTrainingModule:
    """Build the trainable diffusion module from a local Stable Diffusion directory.

    Args:
        directory: a diffusers pipeline directory (``unet/``, ``vae/``, ``text_encoder/``,
            ``tokenizer/``, ``scheduler/``), or a directory with only a UNet ``config.json``.
            Components without weight files get random weights from their config.
        meta: build on the meta device (no weights; for the planner).
        attention: ``sdpa`` (PyTorch's fused scaled-dot-product attention), ``sliced``
            (diffusers attention slicing: less memory, slower) or ``default`` (plain matmuls).
        vae_tiling: encode images tile by tile (large resolutions on small memory).
        cpu_offload: keep the frozen VAE and text encoder on the CPU.
        gradient_checkpointing: recompute UNet block activations in the backward pass.
        prediction_type: override the scheduler's (``epsilon`` or ``v_prediction``).
        validation_prompts: prompts drawn every ``validation_every_n_steps`` optimizer steps
            (:class:`DiffusionValidationImages`, a callback the trainer takes from the model).
        validation_every_n_steps: how often to draw them.
        validation_inference_steps: DDIM steps per validation image.
        guidance_scale: classifier-free guidance of the validation images.
        validation_seed: the noise seed of the validation images (fixed across the run).
        resolution: image side for validation images and example batches (default: the UNet's).
        variant: the weight files to load (``fp16`` for ``*.fp16.safetensors``); default: the
            plain files, or the variant when a folder holds only variant files.
        unused: other keyword arguments of the model-spec builder (``num_classes``...) are ignored.

    Returns:
        A :class:`DiffusionTrainingModule`; the VAE and text encoder are frozen.

    Raises:
        SpecError: when the directory is missing or is not a Stable Diffusion layout.
        MissingExtraError: without diffusers/transformers (``tightfit[hf]``).
    """
    diffusers = require("diffusers", extra="hf", purpose="diffusion fine-tuning")
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise SpecError(f"diffusion:{directory}: no such directory")
    # build_model("diffusion:DIR", meta=True) calls this under torch.device("meta")
    meta = meta or torch.empty(0).is_meta
    has_pipeline = (directory / "unet").is_dir()
    if not has_pipeline and not _is_unet_config(directory / "config.json"):
        raise SpecError(
            f"diffusion:{directory}: not a Stable Diffusion directory (expected unet/, vae/, "
            "text_encoder/, tokenizer/, scheduler/ or a UNet2DConditionModel config.json)"
        )
    for needed in ("vae", "text_encoder", "tokenizer", "scheduler") if has_pipeline else ():
        if not (directory / needed).is_dir():
            raise SpecError(f"diffusion:{directory}: the pipeline has no {needed}/ folder")
    unet_dir = directory / "unet" if has_pipeline else directory
    unet = _load(diffusers.UNet2DConditionModel, unet_dir, meta, variant)
    vae = text_encoder = tokenizer = None
    if has_pipeline:
        transformers = require("transformers", extra="hf", purpose="the diffusion text encoder")
        vae = _load(diffusers.AutoencoderKL, directory / "vae", meta, variant)
        text_encoder = _load(transformers.CLIPTextModel, directory / "text_encoder", meta, variant)
        tokenizer = transformers.CLIPTokenizer.from_pretrained(str(directory / "tokenizer"))
    # The noise schedule is real data (alphas), needed on the CPU even when planning on meta.
    with torch.device("cpu"):
        if has_pipeline:
            noise_scheduler = diffusers.DDPMScheduler.from_pretrained(str(directory), subfolder="scheduler")
        else:
            noise_scheduler = diffusers.DDPMScheduler.from_config(SD15_NOISE_SCHEDULE)
    if prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=prediction_type)

    _set_attention(unet, attention, diffusers)
    if vae_tiling and vae is not None:
        vae.enable_tiling()
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    validation = None
    if validation_prompts:
        if validation_every_n_steps < 1 or validation_inference_steps < 1:
            raise SpecError("validation_every_n_steps and validation_inference_steps must be at least 1")
        validation = ValidationSettings(
            list(validation_prompts),
            validation_every_n_steps,
            validation_inference_steps,
            guidance_scale,
            validation_seed,
            resolution,
        )
    return DiffusionTrainingModule(
        unet,
        noise_scheduler,
        vae,
        text_encoder,
        tokenizer,
        cpu_offload=cpu_offload,
        source=str(directory),
        validation=validation,
    )


def _is_unet_config(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("_class_name") == "UNet2DConditionModel"
    except (json.JSONDecodeError, AttributeError):
        return False


def _set_attention(unet: nn.Module, attention: str, diffusers) -> None:
    processors = diffusers.models.attention_processor
    if attention == "sdpa":
        unet.set_attn_processor(processors.AttnProcessor2_0())
    elif attention == "sliced":
        unet.set_attention_slice("auto")  # half the heads at a time
    elif attention == "default":
        unet.set_attn_processor(processors.AttnProcessor())
    else:
        raise SpecError(f"attention must be sdpa, sliced or default; got {attention!r}")
