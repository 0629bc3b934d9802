"""The run's curves as one picture: ``RUN_DIR/curves.png`` drawn from ``metrics.jsonl``.

``tightfit train`` draws it when a run ends; from Python, call :func:`plot_curves` on a run
directory's ``metrics.jsonl`` (``Trainer.fit`` leaves it out: matplotlib costs about a second).
"""

import json
from pathlib import Path


def plot_curves(metrics_file: Path, output: Path) -> Path | None:
    """Draw loss, validation accuracy and learning rate against the optimizer step.

    Args:
        metrics_file: the run's ``metrics.jsonl``.
        output: the PNG to write.

    Returns:
        ``output``, or None when there is nothing to draw (no training lines).
    """
    records = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    train = [record for record in records if record["stage"] == "train"]
    val = [record for record in records if record["stage"] == "val"]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, safe in threads and on servers
    import matplotlib.pyplot as plt

    figure, (loss_axis, accuracy_axis, lr_axis) = plt.subplots(1, 3, figsize=(13, 3.6))
    loss_axis.plot([r["step"] for r in train], [r["train_loss"] for r in train], label="train")
    if val:
        loss_axis.plot([r["step"] for r in val], [r["val_loss"] for r in val], marker="o", label="validation")
    loss_axis.set(title="loss", xlabel="optimizer step", yscale="log")
    loss_axis.legend()
    if val and "val_accuracy" in val[0]:
        accuracy_axis.plot([r["step"] for r in val], [r["val_accuracy"] for r in val], marker="o")
        accuracy_axis.set(title="validation accuracy", xlabel="optimizer step")
    else:
        accuracy_axis.set_axis_off()
    lr_axis.plot([r["step"] for r in train], [r["lr"] for r in train])
    lr_axis.set(title="learning rate", xlabel="optimizer step")
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output
