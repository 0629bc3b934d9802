"""The progress of a run: a rich bar per epoch in a terminal, plain lines elsewhere.

In a terminal, :class:`ProgressBar` draws one bar per epoch with loss, learning rate, throughput
and memory. Where stdout is not a terminal (CI, ``nohup``, a notebook capturing the output) a
redrawn bar comes out as garbled fragments, so :class:`ProgressLines` prints a plain line instead,
every ``every_s`` seconds and at the end of each epoch::

    epoch 2/12 step 40/120 loss 0.1852 12.3 it/s eta 0:05

:func:`progress_callback` picks the one that fits the console.
"""

import time
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class ProgressBar:
    """A callback that draws the epoch's progress; added by the trainer on rank 0 when
    ``logging.progress`` is on."""

    def __init__(self, console: Any):
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]}  {task.fields[memory]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = None

    def on_fit_start(self, trainer: Any) -> None:
        self.progress.start()

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        self.task = self.progress.add_task(
            "train",
            total=trainer.steps_per_epoch,
            completed=trainer.steps_in_epoch,
            epoch=f"{epoch + 1}/{trainer.config.epochs}",
            loss="-",
            lr="-",
            speed="",
            memory="",
        )

    def on_step_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        rss = trainer.monitor.latest.get("memory/rss_bytes") if trainer.monitor else None
        device_bytes = trainer.monitor.latest.get("memory/cuda_allocated_bytes") if trainer.monitor else None
        memory = f"rss {rss / 2**20:.0f} MiB" if rss else ""
        if device_bytes:
            memory += f" gpu {device_bytes / 2**20:.0f} MiB"
        self.progress.update(
            self.task,
            advance=1,
            loss=f"{metrics['train_loss']:.4f}",
            lr=f"{metrics['lr']:.2e}",
            speed=f"{metrics['samples_per_s']:.0f} samples/s",
            memory=memory,
        )

    def on_epoch_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        self.progress.update(self.task, completed=trainer.steps_per_epoch)

    def on_fit_end(self, trainer: Any, summary: dict[str, Any]) -> None:
        self.progress.stop()

    def on_exception(self, trainer: Any, error: BaseException) -> None:
        self.progress.stop()


class ProgressLines:
    """A callback that prints one plain progress line every ``every_s`` seconds and at each epoch's
    end (``epoch E/N step S/T loss L R it/s eta M:SS``), for output that is not a terminal."""

    def __init__(self, console: Any, every_s: float = 30.0):
        self.console = console
        self.every_s = every_s
        self.epoch_start = self.last_line = 0.0
        self.steps_at_start = 0
        self.loss: float | None = None

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        self.epoch_start = self.last_line = time.perf_counter()
        self.steps_at_start = trainer.steps_in_epoch  # non-zero after a mid-epoch resume

    def on_step_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        self.loss = metrics["train_loss"]
        if time.perf_counter() - self.last_line >= self.every_s:
            self._line(trainer, trainer.steps_in_epoch)

    def on_epoch_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        self._line(trainer, trainer.steps_per_epoch)

    def _line(self, trainer: Any, step: int) -> None:
        now = time.perf_counter()
        self.last_line = now
        rate = (step - self.steps_at_start) / max(now - self.epoch_start, 1e-9)
        left = max(trainer.steps_per_epoch - step, 0)
        eta = f"{int(left / rate) // 60}:{int(left / rate) % 60:02d}" if rate > 0 else "-"
        loss = "-" if self.loss is None else f"{self.loss:.4f}"
        self.console.print(
            f"epoch {trainer.epoch + 1}/{trainer.config.epochs} step {step}/{trainer.steps_per_epoch} "
            f"loss {loss} {rate:.1f} it/s eta {eta}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


def progress_callback(console: Any) -> ProgressBar | ProgressLines:
    """A bar when ``console`` writes to a terminal, plain lines otherwise (``logging.progress``)."""
    return ProgressBar(console) if console.is_terminal else ProgressLines(console)
