"""The model/data contract, checked once before the first training step.

A model and a data set can disagree in ways that do not crash: a UNet given class labels trains
on the stand-in loss of :mod:`tightfit.step.loss` (the mean of its squared outputs) and reports a
test loss of 0.0006; a classifier with 5 outputs for 10 classes fails only on the first batch
holding label 7, on a GPU as an opaque device-side assert. Others crash deep in the model
("mat1 and mat2 shapes cannot be multiplied"). :func:`check_model_data_contract` runs the model
on one training sample (eval mode, no gradient, random state untouched) and says in one line what
does not match and how to fix it (and that some trainable parameter reaches the loss at all):

====================================  ==========================================================
the targets are                        the model must output
====================================  ==========================================================
class indices (integers)               ``(batch, classes)`` with as many classes as the data
values (floats)                        the targets' shape (mean squared error)
absent                                 its own loss (``output.loss``, HF and diffusion models)
====================================  ==========================================================
"""

from typing import Any

import torch

from tightfit.errors import ConfigError
from tightfit.models.builtin import FROM_INPUT_SHAPE
from tightfit.step.batch import move_to_device
from tightfit.step.loss import batch_target, loss_rule, model_output_tensor, split_batch, task_loss
from tightfit.step.precision import autocast
from tightfit.step.rng import rng_state, set_rng_state


def one_sample_batch(dataset: Any, collate_fn: Any = None) -> Any:
    """A batch of the first sample of ``dataset``, collated as the training loader collates."""
    return (collate_fn or torch.utils.data.default_collate)([dataset[0]])


def describe_batch(batch: Any) -> str:
    """The inputs' and the target's shapes, e.g. ``inputs (1, 13), target int64 (1,)``."""
    args, kwargs, target = split_batch(batch)
    shapes = [tuple(value.shape) for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)]
    inputs = ", ".join(str(shape) for shape in shapes) or "none"
    target = batch_target(batch)
    target_text = f"{str(target.dtype).removeprefix('torch.')} {tuple(target.shape)}" if target is not None else "none"
    return f"inputs {inputs}, target {target_text}"


def check_model_data_contract(
    model: torch.nn.Module,
    batch: Any,
    *,
    model_name: str,
    num_classes: int | None,
    precision: str,
    device: torch.device,
) -> list[str]:
    """Run ``model`` on a one-sample ``batch`` and check its output against the targets.

    Args:
        model: the model, on ``device``.
        batch: one sample, collated (see :func:`one_sample_batch`).
        model_name: the model spec or class name, for the messages.
        num_classes: the data's class count, or None.
        precision: the run's precision (the forward runs under the same autocast).
        device: where the model lives.

    Returns:
        Notes that do not stop the run (a classifier with more outputs than the data has classes).

    Raises:
        ConfigError: one line naming what does not match and how to fix it.
    """
    batch = move_to_device(batch, device)
    args, kwargs, _ = split_batch(batch)
    target = batch_target(batch)
    where = f"model {model_name} on one training sample ({describe_batch(batch)})"
    random_state = rng_state()
    was_training = model.training
    model.eval()  # no dropout draw, no BatchNorm statistics update, and a batch of one is allowed
    try:
        # with gradients on: whether any trainable parameter reaches the loss is part of the contract
        with torch.enable_grad(), autocast(precision, device.type):
            output = model(*args, **kwargs)
    except (RuntimeError, ValueError, IndexError, TypeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        builtin = (
            FROM_INPUT_SHAPE.get(model_name.removeprefix("builtin:")) if model_name.startswith("builtin:") else None
        )
        fix = (
            f"leave out model_options.{' and '.join(builtin)}: {model_name} takes "
            f"{'it' if len(builtin) == 1 else 'them'} from the data"
            if builtin
            else "the model's input layer must match the data's samples"
        )
        raise ConfigError(f"{where}: the forward pass fails: {first_line}; {fix}") from None
    finally:
        model.train(was_training)
        set_rng_state(random_state)
    try:
        rule = loss_rule(output, target)
    except (TypeError, StopIteration):
        raise ConfigError(
            f"{where}: the model's output ({type(output).__name__}) holds no tensor to compute a loss from"
        ) from None
    notes = [] if rule == "model" else _check_output(output, target, rule, where=where, num_classes=num_classes)
    try:
        loss = task_loss(output, target)
    except (RuntimeError, ValueError, IndexError) as error:
        raise ConfigError(f"{where}: the loss cannot be computed: {str(error).strip().splitlines()[0]}") from None
    if not loss.requires_grad:
        trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
        cause = (
            "every parameter is frozen (requires_grad=False)"
            if not trainable
            else "the forward pass detaches its output or runs under torch.no_grad()"
        )
        raise ConfigError(
            f"{where}: no trainable parameter reaches the loss: {cause}; training would fail at the first backward pass"
        )
    return notes


def _check_output(
    output: Any, target: torch.Tensor | None, rule: str, *, where: str, num_classes: int | None
) -> list[str]:
    """The output-against-target rules of the module doc, for a loss tightfit computes."""
    shape = tuple(model_output_tensor(output).shape)
    if rule == "stand-in":
        if target is None:
            raise ConfigError(
                f"{where}: the data has no targets and the model computes no loss of its own (output shape {shape}); "
                "give the data targets, or a model whose output has a .loss"
            )
        if not target.is_floating_point():
            classes = f"{num_classes} classes" if num_classes else "classes"
            raise ConfigError(
                f"{where}: the targets are class indices ({classes}) but the model outputs shape {shape}, not (batch, "
                "classes); "
                "use a classifier (e.g. builtin:digits-cnn, builtin:mlp, builtin:small-cnn) or data whose targets "
                "have the output's shape"
            )
        raise ConfigError(
            f"{where}: the targets have shape {tuple(target.shape)} but the model outputs {shape}; "
            "for a regression the output must have the targets' shape (change the model's output layer or the data's "
            "target columns)"
        )
    if rule == "cross-entropy" and num_classes is not None and shape[1] != num_classes:
        if shape[1] < num_classes:
            raise ConfigError(
                f"{where}: the model outputs {shape[1]} classes but the data has {num_classes}; "
                f"give its last layer {num_classes} outputs"
            )
        return [
            f"the model outputs {shape[1]} classes but the data has {num_classes}: {shape[1] - num_classes} outputs "
            "are never the answer"
        ]
    return []
