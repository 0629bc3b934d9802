"""The task loss: one rule for the trainer, the memory tracker and the estimator alike.

A batch is one of:

* a ``Mapping``: passed to the model as keyword arguments (HF style: ``input_ids``,
  ``attention_mask``, ``labels``);
* a pair ``(inputs, target)``: ``inputs`` is a tensor or a tuple of tensors passed positionally;
  ``target`` may be ``None``;
* a bare tensor: the model's only input, no target.

The loss, in order of preference:

1. the model's own loss (``output.loss``), when it computed one (HF models given ``labels``);
2. cross-entropy when the output is ``(batch, classes)`` and the target holds class indices;
3. mean squared error when the target is a float tensor of the output's shape;
4. otherwise the mean of the output's squares in fp32, a stand-in that exercises the whole
   backward pass (used when planning memory for models without a task head).
"""

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F


def split_batch(batch: Any) -> tuple[tuple, dict, torch.Tensor | None]:
    """Split a batch into positional inputs, keyword inputs and the target (or ``None``)."""
    if isinstance(batch, Mapping):
        target = batch.get("target")
        kwargs = {key: value for key, value in batch.items() if key != "target"}
        return (), kwargs, target
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise ValueError(f"a batch given as a sequence must be (inputs, target); got {len(batch)} items")
        inputs, target = batch
        inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        return inputs, {}, target
    return (batch,), {}, None


def batch_target(batch: Any) -> torch.Tensor | None:
    """The target that metrics compare predictions with: a pair's target or a mapping's ``labels``.

    HF-style batches carry their targets as ``labels`` (the model computes its own loss from them),
    so accuracy on a text-classification run is measured against those.
    """
    _, kwargs, target = split_batch(batch)
    if target is None:
        target = kwargs.get("labels")
    return target if isinstance(target, torch.Tensor) else None


def model_output_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a model's output: logits, ``sample`` (diffusers) or the first item."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("logits", "sample", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, Mapping):
        return next(value for value in output.values() if isinstance(value, torch.Tensor))
    if isinstance(output, (tuple, list)):
        return model_output_tensor(output[0])
    raise TypeError(f"cannot find a tensor in the model output of type {type(output).__name__}")


def loss_rule(output: Any, target: torch.Tensor | None) -> str:
    """Which rule of the module doc gives the loss: ``model``, ``cross-entropy``, ``mse`` or ``stand-in``.

    The trainer's model/data contract (``training/contract.py``) refuses to train on ``stand-in``.
    """
    if isinstance(getattr(output, "loss", None), torch.Tensor):
        return "model"
    prediction = model_output_tensor(output)
    if target is not None and prediction.ndim == 2 and not target.is_floating_point():
        return "cross-entropy"
    if target is not None and target.is_floating_point() and target.shape == prediction.shape:
        return "mse"
    return "stand-in"


def task_loss(output: Any, target: torch.Tensor | None) -> torch.Tensor:
    """The loss for one model output and its target, following the rules in the module doc."""
    rule = loss_rule(output, target)
    if rule == "model":
        return output.loss
    prediction = model_output_tensor(output)
    if rule == "cross-entropy":
        return F.cross_entropy(prediction.float(), target)
    if rule == "mse":
        return F.mse_loss(prediction.float(), target.float())
    return prediction.float().pow(2).mean()


def forward_and_loss(model: torch.nn.Module, batch: Any) -> tuple[Any, torch.Tensor]:
    """Run the model on a batch and return ``(output, loss)``."""
    args, kwargs, target = split_batch(batch)
    output = model(*args, **kwargs)
    return output, task_loss(output, target)
