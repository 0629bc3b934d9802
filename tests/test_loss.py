"""The shared task-loss rule and the target metrics read from a batch."""

import torch
import torch.nn.functional as F

from tightfit.step.loss import batch_target, forward_and_loss, task_loss
from tightfit.training.metrics import MetricAccumulator


class _Output:
    def __init__(self, logits, loss=None):
        self.logits, self.loss = logits, loss


def test_cross_entropy_for_class_indices():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([0, 1])
    assert torch.allclose(task_loss(logits, target), F.cross_entropy(logits, target))


def test_model_loss_wins_over_the_rule():
    own = torch.tensor(3.5)
    assert task_loss(_Output(torch.zeros(2, 2), loss=own), torch.tensor([0, 1])) is own


def test_mean_of_squares_without_a_target():
    output = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert task_loss(output, None).item() == (1 + 4 + 9 + 16) / 4


def test_pair_batch_passes_inputs_positionally():
    model = torch.nn.Linear(3, 2)
    batch = (torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))
    output, loss = forward_and_loss(model, batch)
    assert output.shape == (4, 2)
    assert torch.allclose(loss, F.cross_entropy(output, batch[1]))


def test_hf_style_batches_are_scored_against_their_labels():
    labels = torch.tensor([1, 0, 1])
    batch = {"input_ids": torch.zeros(3, 5, dtype=torch.long), "labels": labels}
    assert batch_target(batch) is labels
    metrics = MetricAccumulator()
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])  # right, right, wrong
    metrics.update(_Output(logits, loss=torch.tensor(0.5)), batch_target(batch), torch.tensor(0.5), 3)
    assert abs(metrics.compute("val_")["val_accuracy"] - 2 / 3) < 1e-9
