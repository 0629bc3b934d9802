"""Knowledge distillation: a small student learns from a large teacher's softened outputs.

The loss (Hinton et al. 2015; seed-001's ``DistillationModel``)::

    loss = alpha * T² * KL(softmax(teacher / T) || softmax(student / T))
         + (1 - alpha) * cross_entropy(student, labels)

``T`` (temperature) softens both distributions so the student also learns how the teacher ranks
the wrong classes; the ``T²`` factor keeps the soft term's gradients on the scale of the hard
term's as ``T`` grows.

The trainer is not changed for this: :class:`DistillationModel` wraps student and teacher and its
forward returns an output with ``.loss`` (the shared loss rule uses a model's own loss), and
:class:`LabelledInputs` turns ``(input, label)`` samples into ``{"inputs", "labels"}`` so the
labels reach the forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from tightfit.compression.training import FinetuneSettings, finetune, train_split_only
from tightfit.errors import ConfigError
from tightfit.step.loss import model_output_tensor


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    temperature: float = 4.0,
    alpha: float = 0.7,
) -> torch.Tensor:
    """The distillation loss above (``alpha`` weighs the teacher's term; no labels: alpha = 1)."""
    soft = (
        F.kl_div(
            F.log_softmax(student_logits.float() / temperature, dim=-1),
            F.log_softmax(teacher_logits.float() / temperature, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        * temperature**2
    )
    if labels is None:
        return soft
    hard = F.cross_entropy(student_logits.float(), labels)
    return alpha * soft + (1.0 - alpha) * hard


@dataclass
class DistillationOutput:
    """What :class:`DistillationModel` returns: the loss and the student's logits."""

    loss: torch.Tensor
    logits: torch.Tensor


class DistillationModel(nn.Module):
    """Student + frozen teacher; ``forward(inputs, labels)`` returns :class:`DistillationOutput`.

    Only the student is trainable (the teacher's parameters are set to ``requires_grad=False``;
    :func:`distill` restores them afterwards); the teacher stays in eval mode (no dropout, fixed
    BatchNorm statistics) even when the wrapper is put in train mode.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, *, temperature: float = 4.0, alpha: float = 0.7):
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"distill: temperature must be positive; got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"distill: alpha must be in [0, 1]; got {alpha}")
        self.student = student
        self.teacher = teacher.eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.temperature = temperature
        self.alpha = alpha

    def train(self, mode: bool = True) -> DistillationModel:
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, inputs: Any = None, labels: torch.Tensor | None = None, **kwargs: Any) -> DistillationOutput:
        call_args = (inputs,) if inputs is not None else ()
        student_logits = model_output_tensor(self.student(*call_args, **kwargs))
        with torch.no_grad():
            teacher_logits = model_output_tensor(self.teacher(*call_args, **kwargs))
        loss = distillation_loss(student_logits, teacher_logits, labels, temperature=self.temperature, alpha=self.alpha)
        return DistillationOutput(loss=loss, logits=student_logits)


class LabelledInputs(Dataset):
    """A view of a dataset whose samples become ``{"inputs": x, "labels": y}`` (dicts pass through)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.dataset[index]
        if isinstance(sample, dict):
            return sample
        inputs, label = sample
        return {"inputs": inputs, "labels": label}


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Any,
    *,
    temperature: float = 4.0,
    alpha: float = 0.7,
    settings: FinetuneSettings | None = None,
    run_dir: str | Path | None = None,
    progress: bool = False,
) -> nn.Module:
    """Train ``student`` (in place) to match ``teacher`` on the training split of ``data``.

    Args:
        student: the smaller model; trained in place.
        teacher: the larger trained model; frozen.
        data: a ``DataBundle`` or ``(train, val, test)`` tuple; samples ``(input, label)`` or dicts.
        temperature: softening temperature ``T`` (2-8 is usual).
        alpha: weight of the teacher's term (``1 - alpha`` for the labels').
        settings: fine-tuning length and learning rate.
        run_dir: the trainer's run directory.
        progress: show the trainer's progress.

    Returns:
        The trained student.

    Raises:
        ConfigError: on a bad temperature or alpha.
    """
    teacher_trainable = [parameter.requires_grad for parameter in teacher.parameters()]
    teacher_was_training = teacher.training
    wrapper = DistillationModel(student, teacher, temperature=temperature, alpha=alpha)
    train_only = train_split_only(data)
    if hasattr(train_only, "train") and not isinstance(train_only, tuple):
        import dataclasses

        train_only = dataclasses.replace(train_only, train=LabelledInputs(train_only.train))
    else:
        train_only = (LabelledInputs(train_only[0]), None, None)
    try:
        finetune(wrapper, train_only, settings, run_dir=run_dir, progress=progress)
    finally:  # the teacher is the caller's model: give it back as it was
        for parameter, trainable in zip(teacher.parameters(), teacher_trainable):
            parameter.requires_grad_(trainable)
        teacher.train(teacher_was_training)
    return student
