"""Checkpoint writing off the training step's critical path.

``save(directory, weights, state, meta)`` copies the tensors (weights, optimizer state) to the
host — a memory copy, the only part the step waits for — and hands the copy to a background
thread, which serialises and writes it with :func:`tightfit.training.checkpoint.save_checkpoint`
(temporary folder, then an atomic rename: never a half-written checkpoint, also when the process is
killed mid-write). Writes happen one at a time, in the order they were asked for: a new one waits
for the previous one, so a checkpoint removed after a newer one was submitted (top-k) is always
already on disk. :meth:`wait` is called before anything reads a checkpoint back and when training
ends; it re-raises what a write raised (a full disk, say).
"""

import threading
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_map

from tightfit.training import checkpoint as checkpoint_files


def _host_copy(value: Any) -> Any:
    return value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value


class CheckpointWriter:
    """Writes checkpoints on one background thread, in order (see the module docstring)."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, directory: Path, weights: dict[str, torch.Tensor], state: dict, meta: dict) -> Path:
        """Snapshot the tensors now, write them in the background; returns the final path."""
        self.wait()
        weights, state = tree_map(_host_copy, weights), tree_map(_host_copy, state)
        self._thread = threading.Thread(
            target=self._write, args=(directory, weights, state, meta), name="tightfit-checkpoint-writer"
        )
        self._thread.start()
        return Path(directory)

    def _write(self, directory: Path, weights: dict, state: dict, meta: dict) -> None:
        try:
            checkpoint_files.save_checkpoint(directory, weights, state, meta)
        except BaseException as error:  # noqa: BLE001 - handed to the training thread by wait()
            self._error = error

    def wait(self) -> None:
        """Block until the write in flight (if any) is on disk; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
