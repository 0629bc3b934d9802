"""tightfit's learning-rate range test against Lightning's, on the same models, data and seeds.

For each model and seed, both finders sweep 100 steps from 1e-7 to 1 with AdamW (weight decay
1e-4) on the digits training split in batches of 64, and each suggests a rate: tightfit's by the
rule of ``training/lr_finder.py`` (lag-free smoothing, steepest slope against log lr before the
minimum), Lightning's by ``Tuner.lr_find(...).suggestion()`` (running average with beta 0.98,
steepest slope against lr). Then the digits recipe (cosine schedule, ``--epochs`` epochs) trains
at each suggested rate and at a grid of fixed rates, and the table shows the best validation loss
and the test accuracy each reached: a suggestion is as good as the training it leads to.

Lightning is not a dependency of tightfit: ``pip install lightning`` into the environment to get
its column; without it the script says so and measures tightfit alone.

Usage:
    python benchmarks/lr_find.py [--models builtin:digits-cnn builtin:mlp] [--seeds 0 1 2] [--epochs 12]
        [--output benchmarks/results/lr_find]
"""

import argparse
import json
import logging
import math
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from tightfit.config import build_config
from tightfit.training.lr_finder import find_learning_rate
from tightfit.training.trainer import Trainer

SWEEP = {"min_lr": 1e-7, "max_lr": 1.0, "num_steps": 100}
GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)


def run_config(model: str, seed: int, lr: float, epochs: int, run_dir: str) -> dict:
    return {
        "model": model,
        "seed": seed,
        "epochs": epochs,
        "run_dir": run_dir,
        "threads": 1,
        "optimizer": {"name": "adamw", "lr": lr, "weight_decay": 1e-4},
        "lr_find": SWEEP,
        "logging": {"console": False, "jsonl": False, "tensorboard": False},
        "monitor": {"enabled": False},
    }


def tightfit_suggestion(model: str, seed: int) -> tuple[float | None, float]:
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(build_config(run_config(model, seed, SWEEP["min_lr"], 1, scratch)))
        trainer.setup()
        start = time.perf_counter()
        result = find_learning_rate(trainer, **SWEEP)
        return result.suggestion, time.perf_counter() - start


def lightning_suggestion(model_spec: str, seed: int) -> tuple[float | None, float]:
    os.environ["TQDM_DISABLE"] = "1"  # Lightning's sweep draws a tqdm bar of its own
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    import lightning.pytorch as pl
    from lightning.pytorch.tuner import Tuner

    from tightfit.data.build import build_datasets
    from tightfit.models.spec import build_model_for_data
    from tightfit.step.loss import forward_and_loss

    torch.manual_seed(seed)
    bundle = build_datasets({"source": "digits"}, seed=seed)
    network, _ = build_model_for_data(model_spec, {}, num_classes=bundle.num_classes, input_shape=bundle.input_shape)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.network = network
            self.lr = SWEEP["min_lr"]

        def training_step(self, batch, batch_index):
            return forward_and_loss(self.network, batch)[1]

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=1e-4)

    loader = torch.utils.data.DataLoader(
        bundle.train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    with tempfile.TemporaryDirectory() as scratch:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=1000,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=scratch,
        )
        start = time.perf_counter()
        finder = Tuner(trainer).lr_find(
            Module(),
            train_dataloaders=loader,
            num_training=SWEEP["num_steps"],
            min_lr=SWEEP["min_lr"],
            max_lr=SWEEP["max_lr"],
        )
        return finder.suggestion(), time.perf_counter() - start


def train_at(model: str, seed: int, lr: float, epochs: int) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        summary = Trainer(build_config(run_config(model, seed, lr, epochs, scratch))).fit()
    return {"lr": lr, "best_val_loss": summary["best_metric"]["value"], "test_accuracy": summary["test_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["builtin:digits-cnn", "builtin:mlp"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--output", default="benchmarks/results/lr_find", help="writes OUTPUT.json and OUTPUT.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        import lightning  # noqa: F401

        has_lightning = True
    except ImportError:
        has_lightning = False
        print("lightning is not installed (pip install lightning): its column is left out, tightfit is measured alone")
    results = {"sweep": SWEEP, "epochs": args.epochs, "lightning": has_lightning, "models": {}}
    for model in args.models:
        rows = []
        for seed in args.seeds:
            row = {"seed": seed}
            for finder, suggest in (
                ("tightfit", tightfit_suggestion),
                ("lightning", lightning_suggestion if has_lightning else None),
            ):
                if suggest is None:
                    continue
                lr, seconds = suggest(model, seed)
                row[finder] = {"suggestion": lr, "sweep_s": round(seconds, 2)}
                if lr is not None:
                    row[finder].update(train_at(model, seed, lr, args.epochs))
                print(f"{model} seed {seed} {finder}: {row[finder]}", flush=True)
            rows.append(row)
        grid = [train_at(model, args.seeds[0], lr, args.epochs) for lr in GRID]
        print(f"{model} grid (seed {args.seeds[0]}): {grid}", flush=True)
        results["models"][model] = {"seeds": rows, "grid": grid}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output + ".json").write_text(json.dumps(results, indent=2))
    Path(args.output + ".md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    finders = ["tightfit"] + (["lightning"] if results["lightning"] else [])
    lines = [
        f"Sweep {results['sweep']}; training: the digits recipe, {results['epochs']} epochs, cosine schedule, at each "
        "rate.",
        "",
    ]
    for model, found in results["models"].items():
        lines += [
            f"### {model}",
            "",
            "| finder | seed | suggested lr | best val_loss | test accuracy |",
            "|---|---|---|---|---|",
        ]
        for finder in finders:
            for row in found["seeds"]:
                entry = row[finder]
                if entry["suggestion"] is None:
                    lines.append(f"| {finder} | {row['seed']} | none | | |")
                else:
                    lines.append(
                        f"| {finder} | {row['seed']} | {entry['suggestion']:.3g} | {entry['best_val_loss']:.4f} | "
                        f"{entry['test_accuracy']:.4f} |"
                    )
            values = [row[finder]["best_val_loss"] for row in found["seeds"] if row[finder]["suggestion"] is not None]
            suggestions = [
                math.log10(row[finder]["suggestion"]) for row in found["seeds"] if row[finder]["suggestion"] is not None
            ]
            if values:
                spread = f"{max(suggestions) - min(suggestions):.2f}" if len(suggestions) > 1 else "-"
                lines.append(f"| {finder} | median | spread {spread} decades | {statistics.median(values):.4f} | |")
        lines += [
            "",
            f"fixed rates (seed {found['seeds'][0]['seed']}):",
            "",
            "| lr | best val_loss | test accuracy |",
            "|---|---|---|",
        ]
        lines += [
            f"| {entry['lr']:g} | {entry['best_val_loss']:.4f} | {entry['test_accuracy']:.4f} |"
            for entry in found["grid"]
        ]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
