"""Rebuild the model of a run folder, once: the base as the trainer built it (spec, seed,
``init_weights``), then the weights or adapters the run saved.

Everything that opens a run to use its model goes through here: ``compress`` (its source run),
``generate``, ``lora merge``, the study's backbones and the distillation teacher.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tightfit.config import load_config
from tightfit.errors import ConfigError, TightfitError
from tightfit.models.generate import LoadedModel, require_causal_lm
from tightfit.models.lora import (
    ADAPTERS_DIR,
    SUMMARY_FILE,
    _is_transformers_model,
    _module_kind,
    _saved_summary,
    adapter_dir,
    base_fingerprint,
    load_adapters,
    merge_adapters,
)
from tightfit.models.spec import _WEIGHT_FILES, _model_folder, build_model, build_model_for_data
from tightfit.runs.checkpoint import (
    WEIGHTS_FILE,
    Restored,
    load_newest_intact,
    load_weights,
    resolve_weights_file,
    save_weights,
)


def build_run_model(
    config, *, num_classes: int | None = None, input_shape: tuple[int, ...] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The model a training config names, built exactly as the trainer builds it: torch seeded with
    ``config.seed`` first (a randomly initialised base comes out the same every time, which is
    what lets a LoRA run store its adapters only), fitted to the data (:func:`build_model_for_data`),
    then ``init_weights`` loaded when set.

    Args:
        config: a ``TrainConfig`` (``model``, ``model_options``, ``seed``, ``init_weights``).
        num_classes: classes of the data's task, for models with a classifier.
        input_shape: the shape of one input sample, or None.

    Returns:
        ``(model, inferred)`` as :func:`build_model_for_data` returns them.

    Raises:
        SpecError: the spec cannot be built. ConfigError: ``init_weights`` is not a checkpoint.
    """
    prefix, _, folder = config.model.partition(":")
    if (
        config.lora is not None
        and not config.init_weights
        and prefix == "hf"
        and not any((_model_folder(folder, config.model) / name).is_file() for name in _WEIGHT_FILES)
    ):
        raise ConfigError(
            f"model {config.model}: the folder has the architecture (config.json) but no weights; LoRA on random "
            "weights "
            "learns nothing useful: point model= at a local folder with the *.safetensors (or set init_weights)"
        )
    torch.manual_seed(config.seed)
    model, inferred = build_model_for_data(
        config.model, config.model_options, num_classes=num_classes, input_shape=input_shape
    )
    if config.init_weights:
        load_weights(model, resolve_weights_file(config.init_weights, where="init_weights"))
    return model, inferred


def load_run_model(
    run_dir: str | Path,
    *,
    merged: bool = True,
    trust_code: bool = False,
    config=None,
    num_classes: int | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> tuple[nn.Module, Restored | None]:
    """The model a run folder trained, rebuilt the one way every reader uses: the base as the
    trainer built it (:func:`build_run_model`), then a LoRA run's adapters (:func:`load_lora_run`)
    or the weights of the newest intact checkpoint, ``best`` first, skipping damaged ones.

    Args:
        run_dir: the run folder (with ``config.yaml`` and ``checkpoints/``).
        merged: fold a LoRA run's adapters into the base.
        trust_code: let the run's ``config.yaml`` name a ``module.path:callable`` model.
        config: the run's config when the caller has already read it.
        num_classes, input_shape: of the run's data, for models fitted to it.

    Returns:
        ``(model, restored)``: ``restored`` says which checkpoint loaded and what was skipped
        (None for a LoRA run, whose adapters come from ``adapters/``).

    Raises:
        ConfigError: no ``config.yaml``, no intact checkpoint, or weights that do not fit.
    """
    run_dir = Path(run_dir).expanduser()
    if config is None:
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"{run_dir}: not a tightfit run directory (no config.yaml)")
        config = load_config(run_dir / "config.yaml", trust_code=trust_code)
    if config.lora is not None:
        return load_lora_run(run_dir, merged=merged, trust_code=trust_code), None
    model, _ = build_run_model(config, num_classes=num_classes, input_shape=input_shape)
    return model, load_newest_intact(run_dir / "checkpoints", model, first="best")


def describe_adapters(path: str | Path) -> dict:
    """What a run's adapters are: settings, counts, files, and the base model they belong to."""
    directory = adapter_dir(path)
    peft_config = json.loads((directory / "adapter_config.json").read_text())
    saved = json.loads((directory / SUMMARY_FILE).read_text()) if (directory / SUMMARY_FILE).is_file() else {}
    summary = saved.get("summary") or {}
    files = {item.name: item.stat().st_size for item in sorted(directory.iterdir()) if item.is_file()}
    # only the model's name is read here, nothing is built: no code can run, whatever the spec
    run_config = _run_config(directory.parent, trust_code=True) if directory.name == ADAPTERS_DIR else None
    targets = summary.get("target_modules") or sorted(peft_config.get("target_modules") or [])
    return {
        "adapters": str(directory),
        "base_model": run_config.model if run_config is not None else None,
        "rank": peft_config.get("r"),
        "alpha": peft_config.get("lora_alpha"),
        "dropout": peft_config.get("lora_dropout"),
        "bias": peft_config.get("bias"),
        "target_modules": len(targets),
        "target_kinds": sorted({_module_kind(name) for name in targets}),
        "modules_to_save": list(peft_config.get("modules_to_save") or []),
        "quantize_base": summary.get("quantize_base"),
        "trainable_parameters": summary.get("trainable_parameters"),
        "total_parameters": summary.get("total_parameters"),
        "adapter_bytes": files.get("adapter_model.safetensors"),
        "files": files,
    }


def _run_config(run_dir: Path, *, trust_code: bool = False):
    """The resolved training config a run saved (``RUN_DIR/config.yaml``), or None.

    ``trust_code``: accept a ``module.path:callable`` model (see ``tightfit.trust``).
    """
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        return None
    return load_config(str(config_file), [], trust_code=trust_code)


def _head_classes(directory: Path) -> int | None:
    """Classes of the trained head saved with the adapters (the base is rebuilt with that many)."""
    from safetensors import safe_open

    with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as handle:
        shapes = [
            handle.get_slice(key).get_shape() for key in handle.keys() if "lora_" not in key and key.endswith("weight")
        ]
    two_dimensional = [shape for shape in shapes if len(shape) == 2]
    return int(two_dimensional[-1][0]) if two_dimensional else None


def load_lora_run(run_dir: str | Path, *, merged: bool = False, trust_code: bool = False) -> nn.Module:
    """The trained model of a LoRA run, for inference: the base rebuilt from the run's config as
    the trainer built it (:func:`build_run_model`: same spec, seed and
    ``init_weights``, in full precision even when it trained on a quantized base), checked
    against the fingerprint saved with the adapters, the adapters loaded on top (with the
    buffers of the checkpoint the run ended on) and, with ``merged``, folded in.
    ``trust_code`` lets the run's ``config.yaml`` name a ``module.path:callable`` model, which
    runs its Python code.

    Raises:
        TightfitError: no adapters or no ``config.yaml`` in ``run_dir``, a rebuilt base that is
            not the one the adapters were trained on, or a Python-callable model spec without
            ``trust_code``.
    """
    directory = adapter_dir(run_dir)
    config = _run_config(directory.parent, trust_code=trust_code)
    if config is None:
        raise TightfitError(f"{directory.parent}: no config.yaml, so the base model cannot be rebuilt")
    base, _ = build_run_model(config, num_classes=_head_classes(directory))
    saved = _saved_summary(directory)
    fingerprint = base_fingerprint(base)
    if saved.get("base_fingerprint") and saved["base_fingerprint"] != fingerprint:
        raise TightfitError(
            f"{directory}: the base rebuilt from {config.model} (seed {config.seed}) differs from the one these "
            "adapters were trained on; were its weight files or init_weights changed since?"
        )
    model = load_adapters(base, directory)
    model.lora_summary.base_fingerprint = fingerprint
    _load_final_checkpoint(model, directory.parent, config)
    return merge_adapters(model).eval() if merged else model


def _load_final_checkpoint(model: nn.Module, run_dir: Path, config) -> None:
    """Load the checkpoint the run ended with (``best`` when the trainer restored it, else
    ``last``): the same adapters as ``adapters/``, plus the buffers (batch-norm statistics) a
    frozen base still updates while it trains."""
    restore_best = not config.early_stopping.enabled or config.early_stopping.restore_best
    names = ("best", "last") if restore_best else ("last",)
    found = next(
        (
            run_dir / "checkpoints" / name / WEIGHTS_FILE
            for name in names
            if (run_dir / "checkpoints" / name / WEIGHTS_FILE).is_file()
        ),
        None,
    )
    if found is not None:
        load_weights(model, found)


def _copy_tokenizer(config, output: Path) -> Path | None:
    """Copy the run's tokenizer files (``data.tokenizer``) beside the merged weights, so that
    ``AutoTokenizer.from_pretrained(output)`` and ``transformers.pipeline`` take the folder as it is.
    Returns the source folder, or None when the run named no tokenizer."""
    import shutil

    from tightfit.data.text import TOKENIZER_FILES, resolve_tokenizer_dir

    if not config.data.tokenizer:
        return None
    source = resolve_tokenizer_dir(config.data.tokenizer)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, output / name)
    return source


def merge_run(
    run_dir: str | Path, output: str | Path | None = None, *, force: bool = False, trust_code: bool = False
) -> dict:
    """Merge a LoRA run's adapters into its base and write the result (``tightfit lora merge``).

    Writes into ``output`` (default ``RUN_DIR/merged``):

    * a diffusion run: a complete Stable Diffusion directory (the source pipeline's VAE, text
      encoder, tokenizer and scheduler, and the merged ``unet/``), loadable by diffusers alone;
    * a transformers model: ``save_pretrained`` (``config.json``, ``model.safetensors``,
      ``generation_config.json``) and the run's tokenizer files, so ``AutoTokenizer``,
      ``AutoModelForCausalLM`` and ``transformers.pipeline`` load the folder as it is;
    * any other model: ``model.safetensors`` (its ``state_dict``);

    and ``config.yaml``: the run's config without its ``lora:`` section, which rebuilds the merged
    architecture (``build_model`` + ``load_weights``).

    Args:
        run_dir: the run directory (or an adapter folder inside one).
        output: where to write; must be empty or absent unless ``force``.
        force: replace files already in ``output``.
        trust_code: let the run's ``config.yaml`` name a ``module.path:callable`` model.

    Returns:
        ``{"output", "files", "parameters", "kind"}``.

    Raises:
        TightfitError: no adapters, no run config, or a non-empty ``output`` without ``force``.
    """
    import shutil

    import yaml

    directory = adapter_dir(run_dir)
    run_dir = directory.parent
    output = Path(output).expanduser() if output is not None else run_dir / "merged"
    if output.exists() and any(output.iterdir()) and not force:
        raise TightfitError(f"--output {output}: the folder is not empty (use --force to replace its files)")
    model = load_lora_run(run_dir, merged=True, trust_code=trust_code)
    output.mkdir(parents=True, exist_ok=True)
    config = _run_config(run_dir, trust_code=trust_code)
    source = getattr(model, "source", None)
    if hasattr(model, "unet") and source and (Path(source) / "model_index.json").is_file():
        kind = "diffusers pipeline"
        # the trained UNet and the frozen encoders are written as plain weights (a variant-only
        # source folder, *.fp16.safetensors, would otherwise need variant="fp16" to load)
        for item in Path(source).iterdir():
            if item.name in ("unet", "vae", "text_encoder"):
                continue
            target = output / item.name
            if item.is_dir():
                shutil.copytree(item, target, dirs_exist_ok=True)
            else:
                shutil.copy2(item, target)
        model.unet.save_pretrained(str(output / "unet"))
        model.vae.save_pretrained(str(output / "vae"))
        model.text_encoder.save_pretrained(str(output / "text_encoder"))
    elif _is_transformers_model(model):
        kind = "transformers"
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = True  # off while training; the merged model is for inference
        model.save_pretrained(str(output))  # config.json, model.safetensors and generation_config.json
        tokenizer_copied = _copy_tokenizer(config, output) is not None
    else:
        kind = "state_dict"
        save_weights(model, output / "model.safetensors")
    from tightfit.config import map_paths
    from tightfit.paths import relative_inside

    tree = config.model_dump(mode="json")
    tree["lora"] = None
    tree["run_dir"] = None
    if kind == "transformers":  # the folder is the model now: config.json and weights, its tokenizer beside them
        tree["model"], tree["init_weights"] = f"hf:{output.absolute()}", None
        if tokenizer_copied:
            tree["data"]["tokenizer"] = str(output.absolute())
    tree = map_paths(tree, lambda path, key: relative_inside(path, output))  # so the merged folder can move
    (output / "config.yaml").write_text(
        "# the merged model of "
        + str(run_dir)
        + " (LoRA folded into the base weights)\n"
        + yaml.safe_dump(tree, sort_keys=False)
    )
    files = sorted(str(path.relative_to(output)) for path in output.rglob("*") if path.is_file())
    return {
        "output": str(output),
        "kind": kind,
        "files": files,
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
    }


def load_for_generation(path: str | Path, *, device: str = "cpu", trust_code: bool = False) -> LoadedModel:
    """The model at ``path`` (a run directory, a transformers folder or a diffusers folder);
    ``trust_code`` lets a run's ``config.yaml`` name a ``module.path:callable`` model.

    Raises:
        ConfigError: nothing there, a run or folder that is neither a causal LM nor a diffusion
            model, a missing tokenizer.
    """
    path = Path(path).expanduser()
    # a merged folder holds the config.yaml of its run beside its own config.json and weights, but
    # no checkpoints/: it is a transformers folder first
    merged = (path / "config.json").is_file() and not (path / "checkpoints").is_dir()
    if (path / "config.yaml").is_file() and not merged:
        loaded = _load_run(path, trust_code)
    elif (path / "model_index.json").is_file():
        from tightfit.models.diffusion import build_diffusion_model

        loaded = LoadedModel(build_diffusion_model(path), "diffusion", source=str(path))
    elif (path / "config.json").is_file():
        from tightfit.data.text import load_tokenizer, resolve_tokenizer_dir

        model = build_model(f"hf:{path}")
        require_causal_lm(model, str(path))
        tokenizer = load_tokenizer(resolve_tokenizer_dir(str(path)))
        loaded = LoadedModel(
            model, "causal-lm", tokenizer, template=bool(getattr(tokenizer, "chat_template", None)), source=str(path)
        )
    elif not path.exists():
        raise ConfigError(f"{path}: no such run directory or model folder")
    else:
        raise ConfigError(
            f"{path}: neither a tightfit run (config.yaml) nor a model folder (config.json or model_index.json)"
        )
    loaded.model.to(device).eval()
    return loaded


def _load_run(run_dir: Path, trust_code: bool) -> LoadedModel:
    config = load_config(run_dir / "config.yaml", trust_code=trust_code)
    if config.model.startswith("diffusion:"):
        model = load_lora_run(run_dir, trust_code=trust_code) if config.lora is not None else build_run_model(config)[0]
        return LoadedModel(model, "diffusion", source=str(run_dir))
    if config.data.source != "text-corpus":
        raise ConfigError(
            f"{run_dir}: this run trained {config.model} on {config.data.source} data, not a language model on a text "
            "corpus"
        )
    model, _ = load_run_model(run_dir, config=config, trust_code=trust_code)
    require_causal_lm(model, str(run_dir))
    from tightfit.data.lm_corpus import corpus_files
    from tightfit.data.text import load_tokenizer, resolve_tokenizer_dir

    tokenizer = load_tokenizer(resolve_tokenizer_dir(config.data.tokenizer))
    conversations = any(file.suffix == ".jsonl" for file in corpus_files(config.data.path))
    return LoadedModel(model, "causal-lm", tokenizer, template=conversations, source=str(run_dir))
