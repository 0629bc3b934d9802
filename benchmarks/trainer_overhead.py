"""What tightfit's trainer costs over a plain PyTorch loop: samples/s of both on the same job.

The job: the digits recipe (``builtin:digits-cnn``, AdamW, cosine schedule, micro-batch 64,
validation every epoch, test at the end), fp32 on CPU by default. The plain loop is the loop a
careful person writes by hand (seed-004): shuffle, forward, cross-entropy, backward, step,
schedule, validate under ``inference_mode``. tightfit runs with its default features on (numerics
guard, gradient-norm tracking, resource monitor, JSON-lines and TensorBoard logs, ``last`` and
``best`` checkpoints, the HTML report) except the console. When ``lightning`` is installed (it
is not a dependency of tightfit: ``pip install lightning`` into the benchmark's environment), a
third row runs the same job through ``lightning.Trainer`` with its defaults (checkpoint of the
last epoch) less the progress bar, the model summary and the logger.

Runs alternate (plain, tightfit, plain, ...) so that load from other processes hits both alike;
the table shows the median of ``--repeats`` runs of each, per wall-clock second and per CPU
second of the process (the latter is what to compare on a machine shared with other work: time
spent waiting for a core does not count, time in tightfit's own threads does).

Usage:
    python benchmarks/trainer_overhead.py [--epochs 4] [--repeats 5] [--threads 1] [--width 32]
"""

import argparse
import math
import statistics
import tempfile
import time

import torch

from tightfit.data.build import build_datasets
from tightfit.data.config import DataConfig
from tightfit.models.spec import build_model
from tightfit.training.trainer import Trainer


def plain_loop(epochs: int, batch_size: int, lr: float, seed: int, width: int) -> tuple[float, float]:
    """Train by hand; returns training samples per wall-clock second and per CPU second."""
    torch.manual_seed(seed)
    bundle = build_datasets(DataConfig(), seed=seed)
    model = build_model("builtin:digits-cnn", num_classes=bundle.num_classes, width=width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    train_loader = torch.utils.data.DataLoader(bundle.train, batch_size=batch_size, shuffle=True)
    val_loader = torch.utils.data.DataLoader(bundle.val, batch_size=batch_size)
    test_loader = torch.utils.data.DataLoader(bundle.test, batch_size=batch_size)
    total_steps = epochs * len(train_loader)
    warmup = round(0.05 * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total_steps - warmup))))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    loss_function = torch.nn.CrossEntropyLoss()

    def evaluate(loader) -> float:
        model.eval()
        correct = 0
        with torch.inference_mode():
            for images, labels in loader:
                correct += int((model(images).argmax(1) == labels).sum())
        model.train()
        return correct / len(loader.dataset)

    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(epochs):
        model.train()
        for images, labels in train_loader:
            loss = loss_function(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        evaluate(val_loader)
    evaluate(test_loader)
    samples = epochs * len(bundle.train)
    return samples / (time.perf_counter() - start), samples / (time.process_time() - start_cpu)


def tightfit_loop(epochs: int, batch_size: int, lr: float, seed: int, width: int) -> tuple[float, float]:
    """The same job through ``Trainer``; returns samples per wall-clock and per CPU second of ``fit()``."""
    with tempfile.TemporaryDirectory() as run_dir:
        config = {
            "epochs": epochs,
            "seed": seed,
            "run_dir": run_dir,
            "model_options": {"width": width},
            "optimizer": {"name": "adamw", "lr": lr, "weight_decay": 1e-4},
            "batch": {"micro_batch_size": batch_size},
            "logging": {"console": False},
        }
        trainer = Trainer(config)
        trainer.setup()
        start, start_cpu = time.perf_counter(), time.process_time()
        summary = trainer.fit()
        samples = summary["samples_seen"]
        return samples / (time.perf_counter() - start), samples / (time.process_time() - start_cpu)


def lightning_loop(epochs: int, batch_size: int, lr: float, seed: int, width: int) -> tuple[float, float] | None:
    """The same job through ``lightning.Trainer``; None when lightning is not installed."""
    try:
        import lightning
    except ImportError:
        return None
    torch.manual_seed(seed)
    bundle = build_datasets(DataConfig(), seed=seed)
    train_loader = torch.utils.data.DataLoader(bundle.train, batch_size=batch_size, shuffle=True)
    val_loader = torch.utils.data.DataLoader(bundle.val, batch_size=batch_size)
    test_loader = torch.utils.data.DataLoader(bundle.test, batch_size=batch_size)
    total_steps = epochs * len(train_loader)

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = build_model("builtin:digits-cnn", num_classes=bundle.num_classes, width=width)

        def training_step(self, batch, index):
            images, labels = batch
            return torch.nn.functional.cross_entropy(self.model(images), labels)

        def validation_step(self, batch, index):
            images, labels = batch
            self.log("val_accuracy", (self.model(images).argmax(1) == labels).float().mean())

        def test_step(self, batch, index):
            images, labels = batch
            self.log("test_accuracy", (self.model(images).argmax(1) == labels).float().mean())

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=1e-4)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    with tempfile.TemporaryDirectory() as root:
        trainer = lightning.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            devices=1,
            default_root_dir=root,
            enable_progress_bar=False,
            enable_model_summary=False,
            logger=False,
        )
        module = Module()
        start, start_cpu = time.perf_counter(), time.process_time()
        trainer.fit(module, train_loader, val_loader)
        trainer.test(module, test_loader, verbose=False)
        samples = epochs * len(bundle.train)
        return samples / (time.perf_counter() - start), samples / (time.process_time() - start_cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the CI box has 2 cores)")
    parser.add_argument(
        "--width", type=int, default=32, help="digits-cnn width (32: the recipe; larger: heavier steps)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plain, tightfit, lightning = [], [], []
    for repeat in range(args.repeats):
        plain.append(plain_loop(args.epochs, 64, 3e-3, seed=repeat, width=args.width))
        tightfit.append(tightfit_loop(args.epochs, 64, 3e-3, seed=repeat, width=args.width))
        lightning_run = lightning_loop(args.epochs, 64, 3e-3, seed=repeat, width=args.width)
        if lightning_run is not None:
            lightning.append(lightning_run)
        print(
            f"run {repeat + 1}: plain {plain[-1][0]:.0f} samples/s ({plain[-1][1]:.0f} per CPU s), "
            f"tightfit {tightfit[-1][0]:.0f} samples/s ({tightfit[-1][1]:.0f} per CPU s)"
            + (f", lightning {lightning[-1][0]:.0f} samples/s ({lightning[-1][1]:.0f} per CPU s)" if lightning else "")
        )
    wall = [statistics.median(run[0] for run in runs) for runs in (plain, tightfit)]
    cpu = [statistics.median(run[1] for run in runs) for runs in (plain, tightfit)]
    print()
    print("| loop | samples/s, wall clock | ratio | samples per CPU second | ratio |")
    print("|---|---:|---:|---:|---:|")
    print(f"| plain PyTorch | {wall[0]:.0f} | 1.00 | {cpu[0]:.0f} | 1.00 |")
    print(f"| tightfit Trainer | {wall[1]:.0f} | {wall[1] / wall[0]:.2f} | {cpu[1]:.0f} | {cpu[1] / cpu[0]:.2f} |")
    if lightning:
        lightning_wall = statistics.median(run[0] for run in lightning)
        lightning_cpu = statistics.median(run[1] for run in lightning)
        print(
            f"| Lightning {_version('lightning')} | {lightning_wall:.0f} | {lightning_wall / wall[0]:.2f} | "
            f"{lightning_cpu:.0f} | {lightning_cpu / cpu[0]:.2f} |"
        )
    else:
        print("| Lightning | not installed (pip install lightning) | - | - | - |")
    print(f"(medians of {args.repeats} alternating runs; CPU seconds are the process's, all threads)")
    print(
        f"\njob: digits-cnn width {args.width}, {args.epochs} epochs, batch 64, AdamW, cosine, fp32, CPU, "
        f"{args.threads} threads, torch {torch.__version__}"
    )


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
