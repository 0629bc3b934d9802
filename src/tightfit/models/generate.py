"""Try what a run learnt: text from a causal language model, images from a diffusion model.

``tightfit generate RUN_DIR|MODEL_DIR --prompt "..."`` (and :func:`generate_text` /
:func:`generate_images` from Python) loads

* a run directory: its ``config.yaml`` rebuilds the model as the trainer built it; a LoRA run gets
  its adapters merged into the full-precision base (:func:`~tightfit.models.lora.load_lora_run`),
  any other run its last checkpoint's weights;
* a transformers model folder (``config.json`` + weights) or a diffusers pipeline folder
  (``model_index.json``).

Text is decoded token by token with a KV cache: the prompt goes through the model once, then each
new token attends to the cached keys and values of the ones before it, so a token costs one
position's compute instead of the whole sequence's (``use_cache=False`` recomputes, for models
without a cache and for the test that both agree). ``temperature: 0`` is greedy decoding;
otherwise the logits are divided by the temperature and a token is drawn from the smallest set
whose probabilities add up to ``top_p`` (nucleus sampling, Holtzman et al. 2019), from a seeded
generator.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from tightfit.errors import ConfigError

CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` predicts the next token (a transformers ``*ForCausalLM``/``*LMHeadModel``,
    ``builtin:tiny-gpt``, or anything whose ``config.is_causal_lm`` is true)."""
    config = getattr(model, "config", None)
    return bool(getattr(config, "is_causal_lm", False)) or type(model).__name__.endswith(CAUSAL_LM_SUFFIXES)


def require_causal_lm(model: nn.Module, where: str) -> None:
    """Raise a one-line :class:`ConfigError` naming ``where`` unless ``model`` is a causal LM."""
    if not is_causal_lm(model):
        raise ConfigError(
            f"{where}: {type(model).__name__} is not a causal language model "
            f"(expected a *ForCausalLM architecture such as LlamaForCausalLM, or builtin:tiny-gpt)"
        )


@dataclass
class Generation:
    """The result of :func:`generate_text`."""

    prompt: str
    text: str
    prompt_tokens: int
    new_tokens: int
    stopped: str  # "eos", "max_new_tokens" or "max_length"
    seconds: float
    settings: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)

    def to_dict(self) -> dict:
        return asdict(self) | {"tokens_per_s": round(self.tokens_per_s, 2)}


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Pick the next token from the last position's logits (greedy when ``temperature`` is 0)."""
    if temperature <= 0:
        return int(logits.argmax())
    probabilities = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probabilities, order = probabilities.sort(descending=True)
        before = sorted_probabilities.cumsum(0) - sorted_probabilities
        sorted_probabilities[before >= top_p] = 0.0  # the first token is always kept
        probabilities = torch.zeros_like(probabilities).scatter_(0, order, sorted_probabilities)
    return int(torch.multinomial(probabilities.cpu(), 1, generator=generator))


def _accepts_cache(model: nn.Module) -> bool:
    return "past_key_values" in inspect.signature(model.forward).parameters


@torch.inference_mode()
def generate_token_ids(
    model: nn.Module,
    prompt_ids: list[int],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_id: int | None = None,
    use_cache: bool = True,
    max_length: int | None = None,
    on_token: Callable[[int], None] | None = None,
) -> tuple[list[int], str]:
    """New token ids after ``prompt_ids`` and why decoding stopped (``eos``, ``max_new_tokens``,
    ``max_length``); ``on_token`` is called with each id as soon as it is chosen."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    use_cache = use_cache and _accepts_cache(model)
    ids = torch.tensor([prompt_ids], device=device)
    step_input, past = ids, None
    new: list[int] = []
    stopped = "max_new_tokens"
    for _ in range(max_new_tokens):
        if max_length is not None and ids.shape[1] >= max_length:
            stopped = "max_length"
            break
        if use_cache:
            output = model(input_ids=step_input, past_key_values=past, use_cache=True)
            past = output.past_key_values
        else:
            output = model(input_ids=ids)
        token = next_token(output.logits[0, -1], temperature, top_p, generator)
        new.append(token)
        if on_token is not None:
            on_token(token)
        if token == eos_token_id:
            stopped = "eos"
            break
        step_input = torch.tensor([[token]], device=device)
        ids = torch.cat([ids, step_input], dim=1)
    return new, stopped


# ---------------------------------------------------------------------------------- loading
@dataclass
class LoadedModel:
    """A model ready to generate, and how its prompts are written."""

    model: nn.Module
    kind: str  # "causal-lm" or "diffusion"
    tokenizer: object = None
    template: bool = False  # render prompts as the corpus rendered conversations
    source: str = ""


# ---------------------------------------------------------------------------------- text and images
def generate_text(
    loaded: LoadedModel,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    use_cache: bool = True,
    raw: bool = False,
    on_text: Callable[[str], None] | None = None,
) -> Generation:
    """Continue (or answer) ``prompt``; ``on_text`` receives the text as it grows, piece by piece.

    Args:
        loaded: from :func:`load_for_generation` (a causal LM).
        prompt: the user's text; rendered with the run's conversation template unless ``raw``.
        max_new_tokens: the most tokens to add.
        temperature: 0 for greedy decoding, else the sampling temperature.
        top_p: nucleus sampling mass (1.0: the whole distribution).
        seed: the sampling generator's seed.
        use_cache: decode with the KV cache.
        raw: give the prompt to the model as plain text.
        on_text: called with each new piece of decoded text (streaming).

    Raises:
        ConfigError: ``loaded`` is not a language model, or a setting is out of range.
    """
    import time

    from tightfit.data.lm_corpus import render_prompt

    if loaded.kind != "causal-lm":
        raise ConfigError(
            f"{loaded.source}: a {loaded.kind} model makes images; text generation needs a causal language model"
        )
    if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise ConfigError("generate: max_new_tokens >= 1, temperature >= 0 and 0 < top_p <= 1 are required")
    tokenizer = loaded.tokenizer
    if loaded.template and not raw:
        prompt_ids = render_prompt(tokenizer, prompt)
    else:
        prompt_ids = tokenizer(prompt)["input_ids"]
    config = getattr(loaded.model, "config", None)
    max_length = getattr(config, "max_position_embeddings", None)
    new_ids: list[int] = []
    printed = ""

    def stream(token: int) -> None:
        nonlocal printed
        new_ids.append(token)
        text = tokenizer.decode(new_ids, skip_special_tokens=True)
        # a token may end mid-character (byte-level BPE): wait until the text is whole
        if on_text is not None and not text.endswith("\ufffd") and len(text) > len(printed):
            on_text(text[len(printed) :])
            printed = text

    start = time.perf_counter()
    _, stopped = generate_token_ids(
        loaded.model,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=use_cache,
        max_length=max_length,
        on_token=stream,
    )
    seconds = time.perf_counter() - start
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    if on_text is not None and len(text) > len(printed):
        on_text(text[len(printed) :])
    settings = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "kv_cache": use_cache,
    }
    return Generation(prompt, text, len(prompt_ids), len(new_ids), stopped, round(seconds, 3), settings)


def generate_images(
    loaded: LoadedModel,
    prompt: str,
    output: str | Path,
    *,
    num_images: int = 1,
    steps: int = 25,
    guidance_scale: float = 7.5,
    seed: int = 0,
    resolution: int | None = None,
) -> list[Path]:
    """Draw ``num_images`` images for ``prompt`` (DDIM, classifier-free guidance; the LoRA
    adapters of a run applied) and write them as PNGs into ``output``.

    Raises:
        ConfigError: ``loaded`` is not a diffusion model, or ``output`` already holds these files.
    """
    from PIL import Image

    from tightfit.models.diffusion import find_diffusion_module

    if loaded.kind != "diffusion":
        raise ConfigError(f"{loaded.source}: a language model makes text; image generation needs a diffusion model")
    output = Path(output).expanduser()
    paths = [output / f"image-{seed + index:04d}.png" for index in range(num_images)]
    taken = [path for path in paths if path.exists()]
    if taken:
        raise ConfigError(f"--output: {taken[0]} already exists (choose another folder or seed)")
    module = find_diffusion_module(loaded.model)
    images = torch.cat(
        [
            module.generate(
                [prompt],
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                seed=seed + index,
                resolution=resolution,
            )
            for index in range(num_images)
        ]
    )
    output.mkdir(parents=True, exist_ok=True)
    for path, image in zip(paths, images):
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(path)
    return paths
