"""Callbacks: plain objects whose methods are named after the loop's events.

A callback implements any subset of the events below; the trainer calls a method only if the
object has it (no base class to inherit). The order in which they fire is documented on
:meth:`tightfit.training.trainer.Trainer.fit`.

``on_fit_start(trainer)``, ``on_epoch_start(trainer, epoch)``,
``on_step_end(trainer, metrics)`` (after every optimizer step, skipped or not),
``on_validation_end(trainer, metrics)``, ``on_epoch_end(trainer, metrics)``,
``on_fit_end(trainer, summary)``; and for exact resume ``state_dict()`` / ``load_state_dict(state)``.

Saved state is keyed by the callback's name: its ``state_key`` attribute if it has one, else its
class name (``#2``, ``#3``... for further callbacks of one class). A resumed run with callbacks
added or removed gives each one its own state back; a callback without saved state starts fresh.

A callback stops the run by setting ``trainer.should_stop = True`` (and ``trainer.stop_reason``).
"""

import math
import shutil
from pathlib import Path
from typing import Any, Protocol


class Callback(Protocol):
    """What the trainer may call on a callback; every method is optional (checked with ``hasattr``)."""

    def on_fit_start(self, trainer: Any) -> None: ...
    def on_epoch_start(self, trainer: Any, epoch: int) -> None: ...
    def on_step_end(self, trainer: Any, metrics: dict[str, float]) -> None: ...
    def on_validation_end(self, trainer: Any, metrics: dict[str, float]) -> None: ...
    def on_epoch_end(self, trainer: Any, metrics: dict[str, float]) -> None: ...
    def on_fit_end(self, trainer: Any, summary: dict[str, Any]) -> None: ...


def callback_names(callbacks: list[Any]) -> list[str]:
    """A stable name for each callback (see the module docstring), in order."""
    names: list[str] = []
    for callback in callbacks:
        base = getattr(callback, "state_key", None) or type(callback).__name__
        name, count = base, 1
        while name in names:
            count += 1
            name = f"{base}#{count}"
        names.append(name)
    return names


def callback_states(callbacks: list[Any]) -> dict[str, Any]:
    """``{name: state}`` of every callback that has state."""
    return {
        name: callback.state_dict()
        for name, callback in zip(callback_names(callbacks), callbacks)
        if hasattr(callback, "state_dict")
    }


def load_callback_states(callbacks: list[Any], states: dict[str, Any]) -> list[str]:
    """Give each callback its saved state by name; returns the names of saved states no callback took."""
    if not isinstance(states, dict):  # a list, by position: checkpoints of tightfit before 0.2
        return ["(states saved by position by an older tightfit)"]
    names = callback_names(callbacks)
    for name, callback in zip(names, callbacks):
        if name in states and hasattr(callback, "load_state_dict"):
            callback.load_state_dict(states[name])
    return sorted(set(states) - set(names))


def is_improvement(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` beats ``best`` by more than ``min_delta`` (``mode``: ``min`` or ``max``)."""
    if value is None or math.isnan(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


class EarlyStopping:
    """Stop when the monitored validation metric has not improved for ``patience`` validations.

    Args:
        monitor: the metric's name, e.g. ``val_loss`` or ``val_accuracy``.
        mode: ``min`` (loss) or ``max`` (accuracy).
        patience: validations without improvement before stopping.
        min_delta: the smallest change that counts as an improvement.
    """

    def __init__(self, monitor: str = "val_loss", mode: str = "min", patience: int = 5, min_delta: float = 0.0):
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.min_delta = min_delta
        self.best: float | None = None
        self.bad_validations = 0

    def on_validation_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        value = metrics.get(self.monitor)
        if value is None:
            return
        if is_improvement(value, self.best, self.mode, self.min_delta):
            self.best = value
            self.bad_validations = 0
            return
        self.bad_validations += 1
        if self.bad_validations >= self.patience:
            trainer.should_stop = True
            trainer.stop_reason = (
                f"early stopping: {self.monitor} did not improve on {self.best:.4g} for {self.patience} validations"
            )

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_validations": self.bad_validations}

    def load_state_dict(self, state: dict) -> None:
        self.best = state["best"]
        self.bad_validations = state["bad_validations"]


class ModelCheckpoint:
    """Write ``last`` (resumable), periodic checkpoints, ``best`` by a validation metric, and the top ``k``.

    ``last`` is written at the end of every epoch. Periodic checkpoints are kept beside it, full
    (resumable) and named after when they were taken: ``step-N`` every ``every_n_steps``
    optimizer steps (mid-epoch, so a killed run loses at most that many steps) and ``epoch-N``
    every ``every_n_epochs`` epochs; ``keep_periodic`` bounds how many stay on disk (the oldest
    go first). A resumed run continues from the newest intact checkpoint, a periodic one included
    (``checkpoint.load_newest_intact``). ``best`` holds the weights with the best monitored value so far;
    ``top-k/`` keeps the ``keep_top_k`` best.

    Args:
        every_n_steps: also write ``step-N`` every this many optimizer steps (None: never).
        monitor: the validation metric that ranks checkpoints.
        mode: ``min`` or ``max``.
        keep_top_k: how many ranked checkpoints to keep under ``top-k/`` (0: none).
        every_n_epochs: also write ``epoch-N`` every this many epochs (None: never).
        keep_periodic: how many ``step-N``/``epoch-N`` checkpoints to keep (None: all).
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        monitor: str = "val_loss",
        mode: str = "min",
        keep_top_k: int = 0,
        every_n_epochs: int | None = None,
        keep_periodic: int | None = None,
    ):
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.keep_periodic = keep_periodic
        self.monitor = monitor
        self.mode = mode
        self.keep_top_k = keep_top_k
        self.best: float | None = None
        self.best_path: str | None = None
        self.top_k: list[tuple[float, str]] = []  # (value, path), best first
        self.periodic: list[str] = []  # step-N / epoch-N names kept, oldest first
        self._resumed = False  # state loaded from a checkpoint: its paths are re-rooted at fit start

    def on_step_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._save_periodic(trainer, f"step-{trainer.global_step}")

    def on_epoch_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        trainer.save_checkpoint("last")
        if self.every_n_epochs and (trainer.epoch + 1) % self.every_n_epochs == 0:
            self._save_periodic(trainer, f"epoch-{trainer.epoch + 1}")

    def _save_periodic(self, trainer: Any, name: str) -> None:
        self.periodic.append(name)  # before the save: its state lists itself among the kept
        trainer.save_checkpoint(name)
        if self.keep_periodic is None or not trainer.process.is_main:
            return
        # the dropped ones are older than the newest, so their background write has finished
        while len(self.periodic) > self.keep_periodic:
            shutil.rmtree(trainer.run_dir / "checkpoints" / self.periodic.pop(0), ignore_errors=True)

    def on_validation_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        value = metrics.get(self.monitor)
        if value is None:
            return
        if is_improvement(value, self.best, self.mode):
            self.best = value
            self.best_path = str(trainer.save_checkpoint("best", weights_only=True, metrics=metrics))
        if self.keep_top_k > 0:
            self._keep_if_top_k(trainer, value, metrics)

    def _keep_if_top_k(self, trainer: Any, value: float, metrics: dict[str, float]) -> None:
        worst_kept = self.top_k[-1][0] if len(self.top_k) >= self.keep_top_k else None
        if worst_kept is not None and not is_improvement(value, worst_kept, self.mode):
            return
        name = f"top-k/step-{trainer.global_step:07d}-{self.monitor}-{value:.4f}"
        path = str(trainer.save_checkpoint(name, weights_only=True, metrics=metrics))
        self.top_k.append((value, path))
        self.top_k.sort(key=lambda item: item[0], reverse=self.mode == "max")
        for _, dropped in self.top_k[self.keep_top_k :]:
            if trainer.process.is_main:
                trainer.checkpoint_writer.remove(dropped)
        self.top_k = self.top_k[: self.keep_top_k]

    def state_dict(self) -> dict:
        return {
            "best": self.best,
            "best_path": self.best_path,
            "top_k": [list(item) for item in self.top_k],
            "periodic": list(self.periodic),
        }

    def load_state_dict(self, state: dict) -> None:
        self.best = state["best"]
        self.best_path = state["best_path"]
        self.periodic = list(state.get("periodic", []))
        self.top_k = [(value, path) for value, path in state["top_k"]]
        self._resumed = True

    def on_fit_start(self, trainer: Any) -> None:
        if not self._resumed:
            return
        # The saved paths name the folder the run was in when it saved them; a resumed run may
        # have been moved or copied since (its original must never be pruned), so they are
        # re-rooted in this run's own checkpoints folder.
        checkpoints = Path(trainer.run_dir) / "checkpoints"
        if self.best_path is not None:
            self.best_path = str(checkpoints / "best")
        self.top_k = [(value, str(checkpoints / "top-k" / Path(path).name)) for value, path in self.top_k]
        # A run killed between writing a top-k checkpoint and the next ``last`` left a directory no
        # state refers to; remove it so the kept set is exactly the recorded one.
        kept = {Path(path).name for _, path in self.top_k}
        top_dir = checkpoints / "top-k"
        if top_dir.is_dir() and trainer.process.is_main:
            for child in top_dir.iterdir():
                if child.name not in kept and child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
