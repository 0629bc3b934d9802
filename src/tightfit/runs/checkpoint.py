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

Under ``distributed.strategy: fsdp`` the weights and the optimizer state are in ``shards/``
instead, written by every rank (``runs/distributed_checkpoint.py``).

The directory is written under a temporary name and moved into place with ``os.replace``; the
previous version is moved aside first and removed last, so a crash at any moment leaves either
the old or the new checkpoint complete (``load_checkpoint`` falls back to the moved-aside one).
A full disk stops the write with a one-line :class:`DiskFullError` and leaves the previous
version in place; temporaries a killed process left behind are removed by
:func:`remove_stale_temporaries` when the next run starts.

Reading back, :func:`load_newest_intact` tries a run's checkpoints newest first (``last``, its
moved-aside ``last.old``, ``best``, the top-k; for a resume every full-state one before the
weights-only ones) and skips any whose files are truncated or refuse to
load safely, saying which file and why, so a damaged ``last`` costs at most the steps since the
next newest checkpoint.
"""

import errno
import json
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from tightfit.errors import ConfigError, TightfitError
from tightfit.models.lora import adapter_checkpoint_metadata, adapter_state_dict, is_lora_model, load_adapter_state

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
WEIGHTS_KIND_KEY = "weights"
ADAPTERS_ONLY = "adapters-only"
SHARDS_DIR = "shards"  # a sharded checkpoint's weights and optimizer state, in DCP's format
_ASIDE_SUFFIX = ".old"
_TEMPORARY_MARK = ".tmp-"
# checkpoints that hold the whole training state (optimizer, schedule, RNG): last and the periodic
# step-N / epoch-N (``checkpoint.every_n_steps`` / ``every_n_epochs``); the others hold weights
# and counters only (best, top-k), so resuming from them is not exact
_FULL_STATE_NAME = re.compile(r"last|(step|epoch)-\d+")


class DiskFullError(TightfitError):
    """A checkpoint did not fit on the disk; the previous checkpoint is intact."""


class DamagedCheckpointError(TightfitError):
    """A checkpoint file is truncated, unreadable, or holds more than plain data."""


def model_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint stores of a model: its state dict, detached and contiguous; for a LoRA
    model (:func:`tightfit.models.lora.apply_lora`) only the adapters, trained heads and buffers
    (:func:`~tightfit.models.lora.adapter_state_dict`), never the frozen base, quantized or not.

    Tied weights (one storage under two names) are cloned apart, as safetensors refuses shared
    storage; loading ties them again through the model's own structure.

    Raises:
        TightfitError: a quantized tensor outside a LoRA run (it has no plain safetensors form).
    """
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
    return {WEIGHTS_KIND_KEY: ADAPTERS_ONLY, **adapter_checkpoint_metadata(model)} if is_lora_model(model) else None


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """Write a model's weights (:func:`model_weights`) to a safetensors file."""
    save_file(
        {name: tensor.cpu() for name, tensor in model_weights(model).items()},
        str(path),
        metadata=weights_metadata(model),
    )


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load weights written by :func:`save_weights` into ``model``: a full checkpoint must match
    every key; an adapters-only one loads into a LoRA model whose base was rebuilt, after checking
    that base's fingerprint (:func:`~tightfit.models.lora.load_adapter_state`).

    Raises:
        DamagedCheckpointError: the file is truncated or not a safetensors file.
        ConfigError: its weights do not fit ``model``.
    """
    try:
        weights = load_file(str(path))
        metadata = _file_metadata(Path(path))
    except (SafetensorError, OSError, ValueError) as error:  # truncated, foreign or unreadable
        raise DamagedCheckpointError(f"{path} is damaged or not a safetensors file ({_first_line(error)})") from None
    _apply_weights(model, weights, Path(path), metadata)


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
        raise ConfigError(
            f"{where}: {path} is neither a weights file, a checkpoint folder nor a run directory with checkpoints"
        )
    return found


def save_checkpoint(
    directory: Path,
    weights: dict[str, torch.Tensor],
    state: dict,
    meta: dict,
    weights_metadata: dict[str, str] | None = None,
) -> Path:
    """Write a checkpoint directory atomically and return its path.

    Args:
        directory: where the checkpoint lives (e.g. ``RUN/checkpoints/last``); replaced if present.
        weights: the model's weights (:func:`model_weights`), on any device.
        state: the training state (see the module doc for what it may contain).
        meta: JSON-serialisable facts shown to people (step, epoch, metrics).
        weights_metadata: strings stored in the weights file's header (:func:`weights_metadata`).

    Raises:
        DiskFullError: the disk filled up during the write; nothing of it is left and the
            previous version of ``directory`` is untouched.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{directory.name}{_TEMPORARY_MARK}", dir=directory.parent))
    try:
        try:
            save_file(
                {name: tensor.cpu() for name, tensor in weights.items()},
                str(temporary / WEIGHTS_FILE),
                metadata=weights_metadata,
            )
            write_state_and_meta(temporary, state, meta)
        except Exception as error:
            if _is_disk_full(error, directory.parent):
                needed = _tensor_bytes(weights) + _tensor_bytes(state)
                shutil.rmtree(temporary, ignore_errors=True)
                free = shutil.disk_usage(directory.parent).free
                previous = (
                    "the previous checkpoint is intact"
                    if complete_checkpoint(directory)
                    else "no checkpoint was written"
                )
                raise DiskFullError(
                    f"disk full at {directory.parent}: checkpoint {directory.name} needs about {_mib(needed)}, "
                    f"{_mib(free)} free; {previous}"
                ) from None
            raise
        move_into_place(temporary, directory)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return directory


def write_state_and_meta(directory: Path, state: dict, meta: dict) -> None:
    """Write ``state.pt`` and ``meta.json`` into a checkpoint directory being built."""
    torch.save(state, directory / STATE_FILE)
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, default=str))


def move_into_place(temporary: Path, directory: Path) -> None:
    """Replace ``directory`` by the complete ``temporary`` one; a crash at any moment leaves one
    of the two complete (the old one moved aside, found again by :func:`complete_checkpoint`)."""
    aside = directory.with_name(directory.name + _ASIDE_SUFFIX)
    if directory.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(directory, aside)
    os.replace(temporary, directory)
    shutil.rmtree(aside, ignore_errors=True)


def _is_disk_full(error: BaseException, folder: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC, or the messages torch's zip writer and
    safetensors give for it (``unexpected pos``, ``StorageFull``), or a nearly full disk."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    if any(sign in text for sign in ("No space left", "StorageFull", "unexpected pos", "failed writing")):
        return True
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def _tensor_bytes(tree: Any) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_tensor_bytes(value) for value in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_tensor_bytes(value) for value in tree)
    return 0


def _mib(count: int) -> str:
    return f"{count / 2**20:.1f} MiB"


def remove_stale_temporaries(checkpoints: Path) -> list[Path]:
    """Remove the half-written ``.NAME.tmp-*`` folders that killed writes left under a run's
    ``checkpoints/`` (and ``checkpoints/top-k/``); call it before this process writes any.

    Returns:
        The folders removed.
    """
    checkpoints = Path(checkpoints)
    removed = []
    for folder in (checkpoints, checkpoints / "top-k"):
        if folder.is_dir():
            for child in folder.iterdir():
                if child.name.startswith(".") and _TEMPORARY_MARK in child.name and child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                    removed.append(child)
    return removed


def _read(directory: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """The weights, state and meta of one checkpoint folder, checked file by file.

    Raises:
        DamagedCheckpointError: naming the file and what is wrong with it.
    """
    for name in (WEIGHTS_FILE, STATE_FILE, META_FILE):
        if not (directory / name).is_file():
            raise DamagedCheckpointError(f"{directory / name} is missing")
    try:
        weights = load_file(str(directory / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as error:  # truncated, foreign or unreadable
        raise DamagedCheckpointError(f"{directory / WEIGHTS_FILE} is damaged ({_first_line(error)})") from None
    try:  # weights_only: a pickle that would build objects or call functions is refused, not run
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DamagedCheckpointError(
            f"{directory / STATE_FILE} holds Python objects a safe load refuses (not written by tightfit; "
            "possibly tampered with)"
        ) from None
    except Exception as error:  # noqa: BLE001  (a damaged zip raises RuntimeError, EOFError, KeyError...)
        raise DamagedCheckpointError(f"{directory / STATE_FILE} is damaged ({_first_line(error)})") from None
    try:
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:
        raise DamagedCheckpointError(f"{directory / META_FILE} is damaged ({_first_line(error)})") from None
    if not isinstance(state, dict) or "counters" not in state or not isinstance(meta, dict):
        raise DamagedCheckpointError(f"{directory} does not hold a tightfit checkpoint (no counters)")
    return weights, state, meta


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _file_metadata(weights_file: Path) -> dict[str, str]:
    """The string header of a safetensors file (``weights: adapters-only`` and the base's facts)."""
    with safe_open(str(weights_file), framework="pt") as handle:
        return handle.metadata() or {}


def _apply_weights(
    model: torch.nn.Module, weights: dict[str, torch.Tensor], directory: Path, metadata: dict[str, str] | None = None
) -> None:
    device = next((parameter.device for parameter in model.parameters()), torch.device("cpu"))
    if (metadata or {}).get(WEIGHTS_KIND_KEY) == ADAPTERS_ONLY:
        load_adapter_state(
            model, {name: tensor.to(device) for name, tensor in weights.items()}, metadata, where=str(directory)
        )
        return
    try:
        model.load_state_dict({name: tensor.to(device) for name, tensor in weights.items()})
    except RuntimeError as error:  # missing, unexpected or resized keys: another model
        raise ConfigError(
            f"checkpoint {directory}: its weights do not fit the model the config builds "
            f"({' '.join(str(error).split())[:300]})"
        ) from None


def load_checkpoint(directory: Path, model: torch.nn.Module) -> tuple[dict, dict]:
    """Load one checkpoint's weights into ``model`` and return ``(state, meta)``; when a crash
    left ``directory`` moved aside (``NAME.old``), that copy is read.

    Raises:
        ConfigError: when ``directory`` holds no complete checkpoint, or its weights do not fit.
        DamagedCheckpointError: a file of it is truncated or unsafe.
    """
    found = complete_checkpoint(directory)
    if found is None:
        raise ConfigError(f"checkpoint: no complete checkpoint in {directory}")
    weights, state, meta = _read(found)
    _apply_weights(model, weights, found, _file_metadata(found / WEIGHTS_FILE))
    return state, meta


def complete_checkpoint(directory: Path) -> Path | None:
    """The checkpoint at ``directory``, or the previous version a crash left moved aside, or None."""
    directory = Path(directory)
    for candidate in (directory, directory.with_name(directory.name + _ASIDE_SUFFIX)):
        weights = (candidate / WEIGHTS_FILE).is_file() or is_sharded(candidate)
        if weights and all((candidate / name).is_file() for name in (STATE_FILE, META_FILE)):
            return candidate
    return None


def is_intact(directory: Path) -> bool:
    """Whether a checkpoint folder reads back whole, through the same safe readers a resume uses
    (a sharded one: its metadata through the restricted unpickler; its shards are read on load)."""
    directory = Path(directory)
    if is_sharded(directory):
        from tightfit.runs.distributed_checkpoint import read_metadata

        try:
            read_metadata(directory / SHARDS_DIR)
        except ConfigError:
            return False
        return all((directory / name).is_file() for name in (STATE_FILE, META_FILE))
    try:
        _read(directory)
    except DamagedCheckpointError:
        return False
    return True


def is_sharded(directory: Path) -> bool:
    """Whether a checkpoint holds its weights as DCP shards (``runs/distributed_checkpoint.py``)."""
    return (Path(directory) / SHARDS_DIR / ".metadata").is_file()


def holds_full_state(folder: Path) -> bool:
    """Whether a checkpoint folder is one the trainer writes with the whole training state
    (``last``, ``step-N``, ``epoch-N``, or one of those moved aside), as opposed to weights only."""
    return _FULL_STATE_NAME.fullmatch(Path(folder).name.removesuffix(_ASIDE_SUFFIX)) is not None


def checkpoint_folders(checkpoints: Path) -> list[Path]:
    """Every checkpoint folder of a run, newest first: by the step in its ``meta.json``, and at
    equal steps one with the whole training state (``last``) before weights-only ones.

    Folders whose meta cannot be read sort last (they are still tried, and reported, in turn).
    """
    checkpoints = Path(checkpoints)
    folders = [
        child
        for parent in (checkpoints, checkpoints / "top-k")
        if parent.is_dir()
        for child in sorted(parent.iterdir())
        if child.is_dir() and _TEMPORARY_MARK not in child.name and child.name != "top-k"
    ]

    def newest_first(folder: Path) -> tuple:
        try:
            step = int(json.loads((folder / META_FILE).read_text(encoding="utf-8"))["step"])
        except (OSError, ValueError, KeyError, TypeError):
            step = -1
        name = folder.name.removesuffix(_ASIDE_SUFFIX)
        # at one step, last (written after a periodic checkpoint of that step) comes first
        return (-step, not holds_full_state(folder), name != "last", folder.name.endswith(_ASIDE_SUFFIX), folder.name)

    return sorted(folders, key=newest_first)


@dataclass
class Restored:
    """What :func:`load_newest_intact` loaded.

    Attributes:
        directory: the checkpoint folder the weights came from.
        state: its training state (only ``counters`` for a weights-only checkpoint).
        meta: its ``meta.json``.
        skipped: one line per newer checkpoint that was damaged, naming the file and why.
    """

    directory: Path
    state: dict
    meta: dict
    skipped: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        """Whether the checkpoint holds the whole training state, for an exact resume."""
        return "optimizer" in self.state


def read_newest_intact(
    checkpoints: Path, *, first: str | None = None, full_state_first: bool = False
) -> tuple[dict[str, torch.Tensor], Restored]:
    """The weights of the newest checkpoint of a run whose files are intact, without a model to
    load them into (the study's backbones load them under a prefix).

    Args:
        checkpoints: the run's ``checkpoints/`` folder.
        first: a checkpoint name to try before the others (``"best"``).
        full_state_first: try the checkpoints that hold the whole training state (newest first)
            before weights-only ones, as a resume needs.

    Returns:
        ``(weights, restored)``: the tensors by name and the :class:`Restored` checkpoint.

    Raises:
        ConfigError: no checkpoint at all, or none intact (each damaged file named).
    """
    checkpoints = Path(checkpoints)
    folders = checkpoint_folders(checkpoints)
    if first is not None:
        folders.sort(key=lambda folder: folder.name.removesuffix(_ASIDE_SUFFIX) != first)  # stable
    if full_state_first:
        folders.sort(key=lambda folder: not holds_full_state(folder))  # stable: newest first within each
    skipped = []
    for folder in folders:
        try:
            weights, state, meta = _read(folder)
        except DamagedCheckpointError as error:
            skipped.append(str(error))
            continue
        return weights, Restored(folder, state, meta, skipped)
    if skipped:
        raise ConfigError(f"no intact checkpoint in {checkpoints}: " + "; ".join(skipped))
    raise ConfigError(
        f"no complete checkpoint in {checkpoints} (the run stopped before its first checkpoint was written); "
        "start it again without --resume, with the same --run-dir"
    )


def load_newest_intact(
    checkpoints: Path, model: torch.nn.Module, *, first: str | None = None, full_state_first: bool = False
) -> Restored:
    """Load the newest checkpoint of a run whose files are intact into ``model``
    (:func:`read_newest_intact`).

    Args:
        checkpoints: the run's ``checkpoints/`` folder.
        model: receives the weights.
        first: a checkpoint name to try before the others (``"best"`` for compression).
        full_state_first: try every checkpoint holding the whole training state (``last``,
            ``step-N``...) before any weights-only one (a resume: a run killed after writing
            ``best`` of an epoch and before its ``last`` replays from the older ``last`` exactly,
            instead of continuing inexactly from the newer ``best``).

    Returns:
        The :class:`Restored` checkpoint, with the damaged ones it skipped.

    Raises:
        ConfigError: no checkpoint at all, none intact (each damaged file named), or weights
            that do not fit ``model``.
    """
    weights, restored = read_newest_intact(checkpoints, first=first, full_state_first=full_state_first)
    _apply_weights(model, weights, restored.directory, _file_metadata(restored.directory / WEIGHTS_FILE))
    return restored
