"""The progress bar of a run (rich): one bar per epoch with loss, learning rate, throughput, memory."""

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
