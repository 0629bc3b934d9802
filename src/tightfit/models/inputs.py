"""Input specs and random batches: what a model is fed when it is planned or measured.

An input spec is a comma-separated list of items, each optionally named (``name=ITEM``):

* ``3x224x224``: a float tensor of that shape per sample (batch dimension added in front);
* ``tokens:512``: 512 token ids per sample; the vocabulary comes from the model's config.

Examples: ``1x8x8`` (sklearn digits), ``3x224x224`` (ImageNet), ``1x96x96x96`` (a volume),
``tokens:512`` (a language model), ``pixel_values=3x224x224,input_ids=tokens:77``.

:func:`make_batch_factory` turns the specs into ``factory(batch_size, device) -> batch``, in one
of the batch forms :mod:`tightfit.step.loss` accepts, with a target that gives the model the
same loss it trains with: class indices when the model outputs ``(batch, classes)``, ``labels =
input_ids`` for language models that take ``labels``, a float target for image-to-image models.
"""

import inspect
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tightfit.errors import SpecError
from tightfit.step.loss import model_output_tensor

_NAME = re.compile(r"[A-Za-z_]\w*")
_SHAPE = re.compile(r"\d+(x\d+)*")
_TOKENS = re.compile(r"tokens:(\d+)")


@dataclass(frozen=True)
class InputSpec:
    """One model input.

    Attributes:
        kind: ``"float"`` (a float tensor) or ``"tokens"`` (int64 token ids).
        shape: the per-sample shape: ``(3, 224, 224)``, or ``(512,)`` for 512 tokens.
        name: the keyword the model takes it as, or ``None`` for the default
            (``input_ids`` for tokens; positional for a lone float input).
    """

    kind: str
    shape: tuple[int, ...]
    name: str | None = None

    def __str__(self) -> str:
        body = f"tokens:{self.shape[0]}" if self.kind == "tokens" else "x".join(map(str, self.shape))
        return f"{self.name}={body}" if self.name else body


def parse_input_spec(text: str) -> list[InputSpec]:
    """Parse ``"3x224x224"``, ``"tokens:512"`` or several of them separated by commas.

    Raises:
        SpecError: naming the item that is not a shape, has a zero dimension or a bad name.

    Example:
        >>> parse_input_spec("3x224x224")
        [InputSpec(kind='float', shape=(3, 224, 224), name=None)]
    """
    if not isinstance(text, str) or not text.strip():
        raise SpecError("input spec is empty (expected e.g. 3x224x224 or tokens:512)")
    specs = []
    for item in text.split(","):
        item = item.strip()
        name = None
        body = item
        if "=" in item:
            name, body = (part.strip() for part in item.split("=", 1))
            if not _NAME.fullmatch(name):
                raise SpecError(f"input spec {text!r}: {name!r} is not a valid input name")
        tokens = _TOKENS.fullmatch(body)
        if tokens:
            kind, shape = "tokens", (int(tokens.group(1)),)
        elif _SHAPE.fullmatch(body):
            kind, shape = "float", tuple(int(size) for size in body.split("x"))
        else:
            raise SpecError(
                f"input spec {text!r}: cannot read {item!r} (expected a shape such as 3x224x224 "
                "or token ids such as tokens:512)"
            )
        if 0 in shape:
            raise SpecError(f"input spec {text!r}: {item!r} has a zero-sized dimension")
        specs.append(InputSpec(kind, shape, name))
    names = [spec.name for spec in specs if spec.name]
    if len(names) != len(set(names)):
        raise SpecError(f"input spec {text!r}: the same input name is used twice")
    return specs


def _vocab_size(model: nn.Module | None) -> int | None:
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int):
        return vocab
    if model is not None:
        embedding = next((module for module in model.modules() if isinstance(module, nn.Embedding)), None)
        if embedding is not None:
            return embedding.num_embeddings
    return None


def _forward_parameters(model: nn.Module | None) -> set[str]:
    if model is None:
        return set()
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _make_inputs(inputs: list[InputSpec], batch_size: int, device: Any, vocab_size: int | None) -> dict | tuple:
    """Random inputs: a dict (when any input is named or is tokens) or a tuple of positional tensors."""
    tensors = []
    for spec in inputs:
        if spec.kind == "tokens":
            tensors.append(torch.randint(0, vocab_size, (batch_size, *spec.shape), device=device))
        else:
            tensors.append(torch.randn(batch_size, *spec.shape, device=device))
    if any(spec.kind == "tokens" or spec.name for spec in inputs):
        names = []
        for spec in inputs:
            default = "input_ids" if spec.kind == "tokens" else "pixel_values"
            names.append(spec.name or default)
        if len(names) != len(set(names)):
            raise SpecError(
                f"input spec {','.join(map(str, inputs))!r}: two inputs get the same keyword; name them (name=SHAPE)"
            )
        return dict(zip(names, tensors))
    return tuple(tensors)


def _probe_output(model: nn.Module, inputs: list[InputSpec], vocab_size: int | None) -> torch.Size:
    """The shape of the model's main output for a batch of 2, computed without real memory.

    It runs under FakeTensorMode, so it costs no compute or memory, leaves parameters and buffers
    (BatchNorm statistics) untouched, and works for meta models too (HF code skips its
    data-dependent checks on fake tensors, where plain meta tensors would fail on ``.item()``).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = model.training
    model.eval()  # the shape does not depend on it, and eval keeps BatchNorm buffers untouched
    # FakeTensorMode logs a traceback of a failing kernel before raising; the SpecError says it in one line.
    fake_logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_logger.level
    fake_logger.setLevel(logging.CRITICAL)
    try:
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
            batch = _make_inputs(inputs, 2, device, vocab_size)
            output = model(**batch) if isinstance(batch, dict) else model(*batch)
        return model_output_tensor(output).shape
    except SpecError:
        raise
    except Exception as error:  # any failure here means the input does not suit the model
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SpecError(
            f"input spec {','.join(map(str, inputs))!r} does not fit model {type(model).__name__}: {first_line}"
        ) from None
    finally:
        fake_logger.setLevel(level)
        model.train(was_training)


def make_batch_factory(
    inputs: list[InputSpec],
    model: nn.Module | None = None,
    num_classes: int | None = None,
    *,
    vocab_size: int | None = None,
) -> Callable[[int, Any], Any]:
    """A function ``factory(batch_size, device) -> batch`` of random inputs plus a target.

    With a model, one probe forward pass (on fake or meta tensors) checks that the inputs suit it
    and decides the target:

    * output ``(batch, classes)``: random class indices (as ``labels`` when the model's forward
      takes ``labels``, so it computes its own loss; else as the batch target);
    * output ``(batch, length, vocab)`` from token inputs and a forward taking ``labels``:
      ``labels = input_ids`` (causal or masked language modelling);
    * output of the same shape as the only float input: a random float target (MSE);
    * otherwise no target (the loss is the mean square of the output).

    Args:
        inputs: from :func:`parse_input_spec`.
        model: the model the batches are for (may live on the meta device); ``None`` uses
            ``num_classes`` alone to decide the target.
        num_classes: number of classes when there is no model to probe.
        vocab_size: vocabulary for token inputs when the model's config does not give one.

    Returns:
        The factory. Batches are ``(inputs, target)`` pairs for float inputs and dicts
        (``input_ids``, ``attention_mask``, ``labels`` or ``target``) when tokens are involved.

    Raises:
        SpecError: tokens without a known vocabulary, a sequence longer than the model's
            positions, or inputs the model cannot take.
    """
    if not inputs:
        raise SpecError("input spec is empty (expected e.g. 3x224x224 or tokens:512)")
    vocab_size = vocab_size or _vocab_size(model)
    has_tokens = any(spec.kind == "tokens" for spec in inputs)
    if has_tokens and not vocab_size:
        raise SpecError(
            f"input spec {','.join(map(str, inputs))!r}: token inputs need a vocabulary size, "
            "and the model has no config.vocab_size or embedding to read it from"
        )
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    for spec in inputs:
        if spec.kind == "tokens" and isinstance(max_positions, int) and spec.shape[0] > max_positions:
            raise SpecError(f"input spec 'tokens:{spec.shape[0]}': longer than the model's {max_positions} positions")

    forward_parameters = _forward_parameters(model)
    takes_labels = "labels" in forward_parameters
    takes_attention_mask = "attention_mask" in forward_parameters
    output_shape = _probe_output(model, inputs, vocab_size) if model is not None else None
    classes = None
    target_kind = None  # "classes" | "tokens" | "float" | None
    if output_shape is not None and len(output_shape) == 2:
        target_kind, classes = "classes", output_shape[1]
    elif output_shape is None and num_classes:
        target_kind, classes = "classes", num_classes
    elif has_tokens and takes_labels and output_shape is not None and len(output_shape) == 3:
        target_kind = "tokens"
    elif (
        len(inputs) == 1
        and inputs[0].kind == "float"
        and output_shape is not None
        and tuple(output_shape[1:]) == inputs[0].shape
    ):
        target_kind = "float"

    def factory(batch_size: int, device: Any = "cpu") -> Any:
        batch = _make_inputs(inputs, batch_size, device, vocab_size)
        if isinstance(batch, dict):
            if takes_attention_mask and "input_ids" in batch and "attention_mask" not in batch:
                batch["attention_mask"] = torch.ones_like(batch["input_ids"])
            key = "labels" if takes_labels else "target"
            if target_kind == "classes":
                batch[key] = torch.randint(0, classes, (batch_size,), device=device)
            elif target_kind == "tokens":
                batch["labels"] = batch["input_ids"].clone()
            return batch
        if target_kind == "classes":
            target = torch.randint(0, classes, (batch_size,), device=device)
        elif target_kind == "float":
            target = torch.randn(batch_size, *inputs[0].shape, device=device)
        else:
            target = None
        return (batch[0] if len(batch) == 1 else batch, target)

    return factory
