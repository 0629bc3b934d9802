"""Checkpoint writing off the training step's critical path.

``save(directory, weights, state, meta)`` copies the tensors (weights, optimizer state) to host
memory — a memory copy, the only part the step waits for — and queues the copy for a background
thread, which serialises and writes it with :func:`tightfit.runs.checkpoint.save_checkpoint`
(temporary folder, then an atomic rename: never a half-written checkpoint, also when the process is
killed mid-write). The thread works through its queue in order, removals (``remove``, for top-k)
included, so a checkpoint is never removed before it is written. :meth:`wait` is called before
anything reads a checkpoint back and when training ends; it re-raises what a write raised (a full
disk, say).
"""

import queue
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_map

from tightfit.runs import checkpoint as checkpoint_files


def _host_copy(value: Any) -> Any:
    return value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value


class CheckpointWriter:
    """Writes and removes checkpoints on one background thread, in order (see the module docstring)."""

    def __init__(self) -> None:
        self._tasks: queue.Queue[Callable[[], Any]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(
        self,
        directory: Path,
        weights: dict[str, torch.Tensor],
        state: dict,
        meta: dict,
        weights_metadata: dict[str, str] | None = None,
    ) -> Path:
        """Snapshot the tensors now, write them in the background; returns the final path."""
        weights, state = tree_map(_host_copy, weights), tree_map(_host_copy, state)
        self._submit(lambda: checkpoint_files.save_checkpoint(directory, weights, state, meta, weights_metadata))
        return Path(directory)

    def remove(self, directory: Path | str) -> None:
        """Remove a checkpoint once everything queued before is written."""
        self._submit(lambda: shutil.rmtree(directory, ignore_errors=True))

    def wait(self) -> None:
        """Block until everything queued is done; re-raise the first error a task raised."""
        self._tasks.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        """Finish everything queued, then end and join the thread (re-raises as :meth:`wait`).

        The trainer calls it when ``fit`` ends, so no writer thread outlives the run: a process
        that then leaves its process group and exits has no thread of its own still working.
        """
        try:
            self.wait()
        finally:
            if self._thread is not None:
                self._tasks.put(None)
                self._thread.join()
                self._thread = None

    def _submit(self, task: Callable[[], Any]) -> None:
        if self._thread is None:
            # A daemon: the trainer closes (drains and joins) it before fit returns or raises, so
            # nothing queued is dropped; an interpreter shutting down for another reason is not held up.
            self._thread = threading.Thread(target=self._work, name="tightfit-checkpoint-writer", daemon=True)
            self._thread.start()
        self._tasks.put(task)

    def _work(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:  # close(): everything before it is done
                self._tasks.task_done()
                return
            try:
                if self._error is None:  # after a failure, later writes would only fail the same way
                    task()
            except BaseException as error:  # noqa: BLE001 - handed to the training thread by wait()
                self._error = error
            finally:
                self._tasks.task_done()
