"""LoRA vs the frozen-encoder baseline on the shipped support messages (held-out accuracy).

Both runs use recipes/lora-text-classification.yaml: the packaged MiniLM with mean pooling and a
new linear head, the same data split (data.seed is pinned), epochs, schedule and batch size. They
differ only in what trains:

* baseline: the encoder frozen, only the head trains (``model_options.freeze_encoder=true``,
  no LoRA); its learning rate is chosen from ``--baseline-lrs`` by validation accuracy, so the
  baseline is not handicapped by a learning rate tuned for LoRA;
* LoRA: rank-8 adapters on the attention projections plus the head (the recipe as is).

Accuracy is counted here from the model's logits and the batch ``labels`` on the validation and
test splits (the test split is never used to choose anything).

    python benchmarks/lora_text.py                      # the table in docs/lora.md
    python benchmarks/lora_text.py --epochs 3 --json    # a quick look
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "lora-text-classification.yaml"


def accuracy(trainer, split: str) -> float:
    """Share of ``split`` whose argmax logit is the label."""
    from tightfit.step.batch import move_to_device

    model = trainer.model
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for batch in trainer.loaders[split]:
            batch = move_to_device(batch, trainer.device)
            labels = batch.pop("labels")
            logits = model(**batch).logits
            correct += int((logits.argmax(dim=1) == labels).sum())
            total += labels.numel()
    return correct / total


def run(variant: str, overrides: list[str], epochs: int, seed: int, workdir: Path) -> dict:
    from tightfit.config import load_config
    from tightfit.training.trainer import Trainer

    run_dir = workdir / f"{variant}-seed{seed}-{len(list(workdir.iterdir()))}"
    config = load_config(
        str(RECIPE),
        overrides
        + [
            f"epochs={epochs}",
            f"seed={seed}",
            f"run_dir={run_dir}",
            "logging.progress=false",
            "logging.console=false",
            "logging.tensorboard=false",
            "monitor.enabled=false",
        ],
    )
    trainer = Trainer(config)
    started = time.perf_counter()
    summary = trainer.fit()
    seconds = time.perf_counter() - started
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    return {
        "variant": variant,
        "lr": config.optimizer.lr,
        "seed": seed,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "val_accuracy": accuracy(trainer, "val"),
        "test_accuracy": accuracy(trainer, "test"),
        "test_loss": summary.get("test_loss"),
        "train_seconds": round(seconds, 1),
        "samples": {split: len(loader.dataset) for split, loader in trainer.loaders.items() if loader is not None},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=15, help="epochs for every run (the recipe's 15)")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds (default 0)")
    parser.add_argument(
        "--baseline-lrs", default="0.001,0.01,0.03", help="learning rates tried for the head-only baseline"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--output", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory(prefix="tightfit-lora-text-") as tmp:
        workdir = Path(tmp)
        for seed in [int(s) for s in args.seeds.split(",")]:
            baselines = [
                run(
                    "frozen encoder + head",
                    ["lora=null", "model_options.freeze_encoder=true", f"optimizer.lr={lr}"],
                    args.epochs,
                    seed,
                    workdir,
                )
                for lr in [float(value) for value in args.baseline_lrs.split(",")]
            ]
            best = max(baselines, key=lambda row: row["val_accuracy"])
            best["chosen_by_val"] = True
            rows.extend(baselines)
            rows.append(run("LoRA r=8 + head", [], args.epochs, seed, workdir))

    if args.output:
        args.output.write_text(json.dumps(rows, indent=2) + "\n")
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    print(
        f"support messages: {rows[0]['samples']} samples, {args.epochs} epochs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"{'variant':<24}{'lr':>8}{'seed':>6}{'trainable':>12}"
        f"{'val acc':>9}{'test acc':>10}{'test loss':>11}{'time s':>9}"
    )
    for row in rows:
        mark = " *" if row.get("chosen_by_val") else ""
        print(
            f"{row['variant']:<24}{row['lr']:>8g}{row['seed']:>6}{row['trainable_parameters']:>12,}"
            f"{row['val_accuracy']:>9.3f}{row['test_accuracy']:>10.3f}{row['test_loss']:>11.3f}{row['train_seconds']:>9.1f}{mark}"
        )
    print("* the baseline learning rate chosen by validation accuracy")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
