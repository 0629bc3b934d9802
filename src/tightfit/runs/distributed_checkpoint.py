"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), for ``distributed.strategy: fsdp``.

Every rank writes its own shards of the weights and optimizer state into ``CHECKPOINT/shards/``;
rank 0 adds ``state.pt`` (schedule, RNG, counters...) and ``meta.json`` as in an unsharded
checkpoint (``runs/checkpoint.py``). DCP records each tensor's global shape and every shard's
offset, so the checkpoint loads on any number of processes: 2 ranks -> 1, 1 -> 2 (a one-process
``fsdp`` run trains the whole model and writes the same format). :func:`export_weights`
consolidates it into one safetensors file for inference and ``tightfit compress``.

The write is atomic as for unsharded checkpoints: every rank writes into the same temporary
folder, and once all have finished rank 0 moves it into place.

With LoRA only the trainable parameters (the adapters and task heads) and their optimizer state
are written; the frozen base comes from the model's own source when the run resumes.
"""

import shutil
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from tightfit.errors import ConfigError
from tightfit.runs import checkpoint as checkpoint_files


class ProcessInfo(Protocol):
    """Where this process sits in the run (``training.distributed.ProcessInfo`` is one)."""

    @property
    def is_main(self) -> bool: ...

    @property
    def distributed(self) -> bool: ...


def _options(trainable_only: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None, trainable_only: bool) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    options = _options(trainable_only)
    state = {"model": get_model_state_dict(model, options=options)}
    if optimizer is not None:
        # For a fresh optimizer this creates its state (a step on zero gradients) so the shapes
        # to load into exist; that is what the resumed run is about to overwrite anyway.
        state["optimizer"] = get_optimizer_state_dict(model, optimizer, options=options)
    return state


def _barrier(info: ProcessInfo) -> None:
    if info.distributed:
        dist.barrier()


def save_sharded_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict,
    meta: dict,
    info: ProcessInfo,
    *,
    trainable_only: bool = False,
) -> Path:
    """Write a sharded checkpoint; every rank calls it (it is a collective).

    Args:
        directory: the checkpoint folder (``RUN/checkpoints/last``); replaced if present.
        model: the model as trained (sharded in place by FSDP2, or whole in one process).
        optimizer: its optimizer, or None for a weights-only checkpoint (``best``, ``top-k``).
        state: everything else a resume needs (rank 0's copy is written).
        meta: JSON-ready facts for people.
        info: this process.
        trainable_only: write only the parameters that train (LoRA).
    """
    directory = Path(directory)
    temporary = directory.with_name(f".{directory.name}.tmp-sharded")
    if info.is_main:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    _barrier(info)
    import torch.distributed.checkpoint as dcp

    dcp.save(_state_dicts(model, optimizer, trainable_only), checkpoint_id=temporary / checkpoint_files.SHARDS_DIR)
    _barrier(info)  # every rank's shards are written
    if info.is_main:
        checkpoint_files.write_state_and_meta(temporary, state, meta)
        checkpoint_files.move_into_place(temporary, directory)
    _barrier(info)  # nobody reads the checkpoint before it is in place
    return directory


def load_sharded_checkpoint(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, trainable_only: bool = False
) -> checkpoint_files.Restored:
    """Load a sharded checkpoint into ``model`` (and ``optimizer``), resharding to this world size.

    Returns:
        The checkpoint's folder, state (without the optimizer's, loaded already) and meta.

    Raises:
        ConfigError: when ``directory`` holds no complete sharded checkpoint.
    """
    import json

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    found = checkpoint_files.complete_checkpoint(directory)
    if found is None:
        raise ConfigError(f"checkpoint: no complete checkpoint in {directory}")
    if not checkpoint_files.is_sharded(found):
        raise ConfigError(
            f"checkpoint: {found} was written by a run without distributed.strategy=fsdp (one safetensors file); "
            "resume it with the strategy it was trained with"
        )
    wanted = _state_dicts(model, optimizer, trainable_only)
    dcp.load(wanted, checkpoint_id=found / checkpoint_files.SHARDS_DIR)
    options = _options(trainable_only)
    set_model_state_dict(model, wanted["model"], options=options)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, wanted["optimizer"], options=options)
    state = torch.load(found / checkpoint_files.STATE_FILE, map_location="cpu", weights_only=True)
    meta = json.loads((found / checkpoint_files.META_FILE).read_text())
    return checkpoint_files.Restored(found, state, meta)


def read_sharded_weights(directory: Path, part: str = "model") -> dict[str, torch.Tensor]:
    """The whole model's weights (or, with ``part="optimizer"``, the optimizer state, flattened to
    ``state.NAME.KEY`` keys) from a sharded checkpoint, in this one process (CPU tensors).

    Raises:
        ConfigError: when ``directory`` holds no complete sharded checkpoint.
    """
    # What torch.distributed.checkpoint.format_utils.dcp_to_torch_save does, kept in memory.
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    found = checkpoint_files.complete_checkpoint(directory)
    if found is None or not checkpoint_files.is_sharded(found):
        raise ConfigError(f"export: {directory} holds no complete sharded (DCP) checkpoint")
    state: dict = {}
    _load_state_dict(
        state, storage_reader=FileSystemReader(found / checkpoint_files.SHARDS_DIR),
        planner=_EmptyStateDictLoadPlanner(keys={part}), no_dist=True,
    )
    return {name: tensor.contiguous() for name, tensor in _flatten(state[part]).items() if isinstance(tensor, torch.Tensor)}


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def export_weights(run_dir: Path, checkpoint: str = "best", output: Path | None = None) -> Path:
    """Consolidate a run's sharded checkpoint into one safetensors file.

    Args:
        run_dir: the run folder.
        checkpoint: ``best``, ``last`` or a ``top-k/...`` name under ``RUN_DIR/checkpoints``.
        output: the file to write (default ``RUN_DIR/checkpoints/CHECKPOINT/model.safetensors``,
            which makes the checkpoint usable wherever an unsharded one is).

    Returns:
        The path written.

    Raises:
        ConfigError: no such checkpoint, or the file exists already elsewhere than the default.
    """
    from safetensors.torch import save_file

    directory = Path(run_dir) / "checkpoints" / checkpoint
    if not directory.is_dir():
        available = sorted(path.name for path in (Path(run_dir) / "checkpoints").glob("*") if path.is_dir())
        raise ConfigError(f"export: {directory} does not exist (checkpoints here: {', '.join(available) or 'none'})")
    weights = read_sharded_weights(directory)
    target = Path(output) if output is not None else directory / checkpoint_files.WEIGHTS_FILE
    if output is not None and target.exists():
        raise ConfigError(f"--output: {target} exists already; choose another path")
    temporary = target.with_name(target.name + ".tmp")
    save_file(weights, str(temporary), metadata={"source": str(directory), "format": "tightfit consolidated DCP"})
    temporary.replace(target)
    return target
