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

Reading is safe for a run folder someone hands you: DCP's own ``FileSystemReader`` unpickles
``shards/.metadata`` with plain ``pickle`` and its default load planner reads the non-tensor items
(learning rates, step counts) with a ``torch.load`` that allows any pickle; either would run whatever a
planted pickle says. Here ``.metadata`` goes through :class:`_MetadataUnpickler`, which builds only
the metadata classes torch writes, and every item loads with ``weights_only=True``
(docs/security.md).
"""

import io
import pickle
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


# Every global a ``.metadata`` written by torch 2.x names (torch/distributed/checkpoint/metadata.py
# and filesystem.py); dtypes and torch.Size come from ``torch``, layouts via ``_get_layout``.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "ChunkStorageMetadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "TensorProperties",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file admitting only the classes torch writes into one."""

    def find_class(self, module: str, name: str):
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if name in _METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def read_metadata(shards: Path):
    """``shards/.metadata`` through :class:`_MetadataUnpickler`.

    Raises:
        ConfigError: naming the file, when it is missing, damaged or names anything else.
    """
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    path = Path(shards) / ".metadata"
    try:
        with open(path, "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
    except OSError as error:
        raise ConfigError(f"checkpoint: cannot read {path}: {error.strerror or error}") from None
    except Exception as error:  # noqa: BLE001 - a damaged pickle raises almost anything; none may pass
        raise ConfigError(f"checkpoint: {path} is not checkpoint metadata a safe load accepts ({error})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise ConfigError(f"checkpoint: {path} is not checkpoint metadata (it holds a {type(metadata).__name__})")
    if metadata.storage_meta is None:
        metadata.storage_meta = StorageMeta()
    return metadata


def _safe_reader(shards: Path):
    """A DCP storage reader for ``shards`` whose metadata is read (now, before DCP runs) by
    :func:`read_metadata`; DCP's own reader loads the tensors with ``weights_only=True``."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = read_metadata(shards)

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            # tightfit writes one global .metadata; DCP's fallback to per-rank files is never wanted
            metadata.storage_meta.load_id = self.load_id
            return metadata

        def read_data(self, plan, planner):
            try:
                return super().read_data(plan, planner)
            except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, AssertionError, KeyError) as error:
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise ConfigError(
                    f"checkpoint: a shard in {shards} is damaged or not plain tensors ({first})"
                ) from None

    return SafeFileSystemReader(shards)


def _safe_planner(base):
    """``base`` (DCP's ``DefaultLoadPlanner`` or a subclass) with its non-tensor items loaded
    ``weights_only``; what it does with a loaded item is torch's ``DefaultLoadPlanner.load_bytes``."""
    from torch.distributed.checkpoint._traverse import set_element

    class SafePlanner(base):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            # DCP writes non-tensor items (learning rates, betas, step counts) with torch.save
            try:
                loaded = torch.load(value, map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise ConfigError(
                    f"checkpoint: the item {read_item.dest_index.fqn} holds Python objects a safe load refuses "
                    f"({first})"
                ) from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return SafePlanner


def _safely(load, *args, **kwargs) -> None:
    """Run a DCP load; a refusal raised inside it (DCP wraps every rank's failure in a
    ``CheckpointException``) comes out as the ``ConfigError`` it was."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        load(*args, **kwargs)
    except CheckpointException as wrapped:
        for failure, _ in wrapped.failures.values():
            if isinstance(failure, ConfigError):
                raise failure from None
        raise


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
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    wanted = _state_dicts(model, optimizer, trainable_only)
    shards = found / checkpoint_files.SHARDS_DIR
    _safely(dcp.load, wanted, storage_reader=_safe_reader(shards), planner=_safe_planner(DefaultLoadPlanner)())
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
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    found = checkpoint_files.complete_checkpoint(directory)
    if found is None or not checkpoint_files.is_sharded(found):
        raise ConfigError(f"export: {directory} holds no complete sharded (DCP) checkpoint")
    state: dict = {}
    _safely(
        _load_state_dict,
        state,
        storage_reader=_safe_reader(found / checkpoint_files.SHARDS_DIR),
        planner=_safe_planner(_EmptyStateDictLoadPlanner)(keys={part}),
        no_dist=True,
    )
    return {
        name: tensor.contiguous() for name, tensor in _flatten(state[part]).items() if isinstance(tensor, torch.Tensor)
    }


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
