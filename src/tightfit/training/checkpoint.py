"""Checkpoint files: written atomically, read without unpickling arbitrary objects.

A checkpoint is a directory holding

* ``model.safetensors``: the model's weights (safetensors: no code runs when it is read);
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

from tightfit.errors import ConfigError

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
_ASIDE_SUFFIX = ".old"


def model_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint stores of a model: its state dict, detached and contiguous.

    Tied weights (one storage under two names) are cloned apart, as safetensors refuses shared
    storage; loading ties them again through the model's own structure.
    """
    weights = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    seen_pointers: set[int] = set()
    for name, tensor in weights.items():
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen_pointers:
            weights[name] = tensor.clone()
        seen_pointers.add(pointer)
    return weights


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """Write a model's weights to a safetensors file."""
    save_file({name: tensor.cpu() for name, tensor in model_weights(model).items()}, str(path))


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load weights written by :func:`save_weights` into ``model`` (strict: every key must match)."""
    device = next((parameter.device for parameter in model.parameters()), torch.device("cpu"))
    model.load_state_dict(load_file(str(path), device=str(device)))


def save_checkpoint(directory: Path, weights: dict[str, torch.Tensor], state: dict, meta: dict) -> Path:
    """Write a checkpoint directory atomically and return its path.

    Args:
        directory: where the checkpoint lives (e.g. ``RUN/checkpoints/last``); replaced if present.
        weights: the model's weights (:func:`model_weights`), on any device.
        state: the training state (see the module doc for what it may contain).
        meta: JSON-serialisable facts shown to people (step, epoch, metrics).
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        save_file({name: tensor.cpu() for name, tensor in weights.items()}, str(temporary / WEIGHTS_FILE))
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
