"""Evaluation metrics summed over batches (and over ranks), then divided once.

Loss is averaged per sample; accuracy and top-k accuracy are computed when the output is a
``(batch, classes)`` logit matrix and the target holds class indices. Top-k is reported for
``k = 5`` when there are more than five classes.
"""

from typing import Any

import torch

from tightfit.step.loss import model_output_tensor
from tightfit.training.distributed import ProcessInfo, sum_across_processes

TOP_K = 5


class MetricAccumulator:
    """Running sums of one evaluation pass.

    Example:
        >>> metrics = MetricAccumulator()
        >>> metrics.update(output, target, loss)   # for every batch
        >>> metrics.compute(prefix="val_")          # {"val_loss": ..., "val_accuracy": ...}
    """

    def __init__(self):
        self.samples = 0
        self.loss_sum = 0.0
        self.correct = 0
        self.correct_top_k = 0
        self.classified = 0
        self.num_classes = 0

    def update(self, output: Any, target: torch.Tensor | None, loss: torch.Tensor, batch_samples: int) -> None:
        """Add one batch: its mean ``loss`` over ``batch_samples`` samples, and its predictions."""
        self.samples += batch_samples
        self.loss_sum += float(loss) * batch_samples
        if target is None or target.is_floating_point():
            return
        logits = model_output_tensor(output)
        if logits.ndim != 2 or logits.shape[0] != target.shape[0]:
            return
        self.num_classes = logits.shape[1]
        self.classified += target.shape[0]
        self.correct += int((logits.argmax(dim=1) == target).sum())
        if self.num_classes > TOP_K:
            top_k = logits.topk(TOP_K, dim=1).indices
            self.correct_top_k += int((top_k == target.unsqueeze(1)).any(dim=1).sum())

    def compute(
        self, prefix: str = "", device: torch.device | None = None, process: ProcessInfo | None = None
    ) -> dict[str, float]:
        """The metrics over everything added (and over all ranks), with names like ``val_loss``."""
        totals = [self.samples, self.loss_sum, self.classified, self.correct, self.correct_top_k, self.num_classes]
        if process is not None and process.distributed:
            totals = sum_across_processes(totals, device, process)
        samples, loss_sum, classified, correct, correct_top_k, num_classes = totals
        metrics = {f"{prefix}loss": loss_sum / max(samples, 1)}
        if classified:
            metrics[f"{prefix}accuracy"] = correct / classified
            if num_classes > TOP_K:
                metrics[f"{prefix}top{TOP_K}_accuracy"] = correct_top_k / classified
        return metrics
