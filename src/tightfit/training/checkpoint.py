"""Checkpoint files: written atomically, read without unpickling arbitrary objects.

A checkpoint is a directory holding

* ``model.safetensors``: the model's weights (safetensors: no code runs when it is read); for a
  LoRA run only the adapters, trained heads and buffers, with the base's spec and fingerprint in
  the file's metadata: the frozen base (quantized or not) is rebuilt, not stored, which turns a
  3.4 GB SD 1.5 checkpoint into a few MB (docs/lora.md);
* ``state.pt``: everything else a resume needs (optimizer, schedule, gradient scaler, RNG states,
  counters, callback state), made only of tensors, numbers, strings, lists and dicts, so that
  ``torch.load(weights_only=True)`` reads it;
* ``meta.json``: step, epoch and metrics, for people and for ``--resume``.

The directory is written under a temporary name and moved into place with ``os.replace``; the
previous version is moved aside first and removed last, so a crash at any moment leaves either
the old or the new checkpoint complete (``load_checkpoint`` falls back to the moved-aside one).
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tightfit.errors import ConfigError, TightfitError

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
WEIGHTS_KIND_KEY = "weights"
ADAPTERS_ONLY = "adapters-only"
_ASIDE_SUFFIX = ".old"


def model_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint stores of a model: its state dict, detached and contiguous; for a LoRA
    model (:func:`tightfit.models.lora.apply_lora`) only the adapters, trained heads and buffers
    (:func:`~tightfit.models.lora.adapter_state_dict`), never the frozen base, quantized or not.

    Tied weights (one storage under two names) are cloned apart, as safetensors refuses shared
    storage; loading ties them again through the model's own structure.

    Raises:
        TightfitError: a quantized tensor outside a LoRA run (it has no plain safetensors form).
    """
    from tightfit.models.lora import adapter_state_dict, is_lora_model

    state = adapter_state_dict(model) if is_lora_model(model) else model.state_dict()
    for name, tensor in state.items():
        if type(tensor) is not torch.Tensor and not isinstance(tensor, torch.nn.Parameter):
            raise TightfitError(
                f"cannot write {name} ({type(tensor).__name__}, a quantized tensor) as a checkpoint; "
                "quantized bases are saved through LoRA runs (adapters only) or tightfit compress"
            )
    weights = {name: tensor.detach().contiguous() for name, tensor in state.items()}
    seen_pointers: set[int] = set()
    for name, tensor in weights.items():
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen_pointers:
            weights[name] = tensor.clone()
        seen_pointers.add(pointer)
    return weights


def weights_metadata(model: torch.nn.Module) -> dict[str, str] | None:
    """The safetensors metadata written beside :func:`model_weights`: for a LoRA model
    ``weights: adapters-only`` with the base's spec and fingerprint; None otherwise."""
    from tightfit.models.lora import adapter_checkpoint_metadata, is_lora_model

    return {WEIGHTS_KIND_KEY: ADAPTERS_ONLY, **adapter_checkpoint_metadata(model)} if is_lora_model(model) else None


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """Write a model's weights (:func:`model_weights`) to a safetensors file."""
    save_file({name: tensor.cpu() for name, tensor in model_weights(model).items()}, str(path), metadata=weights_metadata(model))


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load weights written by :func:`save_weights` into ``model``.

    A full checkpoint must match every key; an adapters-only one loads into a LoRA model whose
    base was rebuilt, after checking that base's fingerprint
    (:func:`~tightfit.models.lora.load_adapter_state`).
    """
    from safetensors import safe_open

    device = next((parameter.device for parameter in model.parameters()), torch.device("cpu"))
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    state = load_file(str(path), device=str(device))
    if metadata.get(WEIGHTS_KIND_KEY) == ADAPTERS_ONLY:
        from tightfit.models.lora import load_adapter_state

        load_adapter_state(model, state, metadata, where=str(path))
    else:
        model.load_state_dict(state)


def resolve_weights_file(path: str | Path, where: str) -> Path:
    """The weights file of a run directory (its ``best`` checkpoint, else ``last``), of a
    checkpoint folder, or a ``.safetensors`` file itself.

    Raises:
        ConfigError: naming ``where`` (the setting) when nothing there holds weights.
    """
    path = Path(path).expanduser()
    candidates = [path, path / WEIGHTS_FILE] + [path / "checkpoints" / name / WEIGHTS_FILE for name in ("best", "last")]
    found = next((candidate for candidate in candidates if candidate.is_file()), None)
    if found is None:
        raise ConfigError(f"{where}: {path} is neither a weights file, a checkpoint folder nor a run directory with checkpoints")
    return found


def save_checkpoint(
    directory: Path, weights: dict[str, torch.Tensor], state: dict, meta: dict, weights_metadata: dict[str, str] | None = None
) -> Path:
    """Write a checkpoint directory atomically and return its path.

    Args:
        directory: where the checkpoint lives (e.g. ``RUN/checkpoints/last``); replaced if present.
        weights: the model's weights (:func:`model_weights`), on any device.
        state: the training state (see the module doc for what it may contain).
        meta: JSON-serialisable facts shown to people (step, epoch, metrics).
        weights_metadata: strings stored in the weights file's header (:func:`weights_metadata`).
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        save_file({name: tensor.cpu() for name, tensor in weights.items()}, str(temporary / WEIGHTS_FILE), metadata=weights_metadata)
        torch.save(state, temporary / STATE_FILE)
        (temporary / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        aside = directory.with_name(directory.name + _ASIDE_SUFFIX)
        if directory.exists():
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(directory, aside)
        os.replace(temporary, directory)
        shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return directory


def complete_checkpoint(directory: Path) -> Path | None:
    """The checkpoint at ``directory``, or the previous version a crash left moved aside, or None."""
    directory = Path(directory)
    for candidate in (directory, directory.with_name(directory.name + _ASIDE_SUFFIX)):
        if all((candidate / name).is_file() for name in (WEIGHTS_FILE, STATE_FILE, META_FILE)):
            return candidate
    return None


def load_checkpoint(directory: Path, model: torch.nn.Module) -> tuple[dict, dict]:
    """Load a checkpoint's weights into ``model`` and return ``(state, meta)``.

    Raises:
        ConfigError: when ``directory`` holds no complete checkpoint.
    """
    found = complete_checkpoint(directory)
    if found is None:
        raise ConfigError(f"checkpoint: no complete checkpoint in {directory}")
    load_weights(model, found / WEIGHTS_FILE)
    state = torch.load(found / STATE_FILE, map_location="cpu", weights_only=True)
    meta = json.loads((found / META_FILE).read_text())
    return state, meta
