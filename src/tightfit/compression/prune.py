"""Pruning: unstructured magnitude pruning on a schedule, and structured pruning that shrinks.

Two kinds, because they buy different things:

* **Unstructured magnitude pruning** zeroes the smallest weights, globally (one threshold over all
  layers) or per layer (the same fraction in each). The model keeps its shape, so it is no faster
  and no smaller in memory; it compresses better on disk (see ``gzip_bytes`` in the report) and is
  the first half of seed-001's prune → fine-tune → quantize pipeline. The sparsity grows during
  fine-tuning along a polynomial schedule (TF-MOT's ``PolynomialDecay``) so the network can adapt,
  and is made permanent at the end (the masks folded into the weights).
* **Structured pruning** removes whole channels (and attention heads) with Torch-Pruning's
  dependency graph, so every layer that consumes a removed channel shrinks with it: fewer
  parameters, fewer FLOPs, really faster. BatchNorm statistics are then re-estimated and the model
  fine-tuned.

Example:
    >>> pruner = MagnitudePruner(model, scope="global")
    >>> pruner.set_sparsity(0.5)          # 50 % of the prunable weights are now zero
    >>> pruner.make_permanent()
    >>> print(sparsity_table(model))
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from tightfit._optional import require
from tightfit.errors import ConfigError

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class PolynomialSchedule:
    """Sparsity that grows from ``initial_sparsity`` to ``final_sparsity`` between two steps.

    ``s(t) = s_f + (s_i - s_f) * (1 - (t - begin) / (end - begin)) ** power`` for
    ``begin <= t <= end`` (TF-MOT's ``PolynomialDecay``, power 3: fast at first, gentle at the
    end, when the remaining weights matter most). Masks are recomputed every ``frequency`` steps
    and at ``end_step``.
    """

    initial_sparsity: float = 0.0
    final_sparsity: float = 0.5
    begin_step: int = 0
    end_step: int = 100
    frequency: int = 10
    power: float = 3.0

    def __post_init__(self) -> None:
        for name in ("initial_sparsity", "final_sparsity"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"prune: {name} must be in [0, 1); got {value}")
        if self.end_step <= self.begin_step:
            raise ConfigError(f"prune: end_step ({self.end_step}) must be after begin_step ({self.begin_step})")
        if self.frequency < 1:
            raise ConfigError(f"prune: frequency must be at least 1; got {self.frequency}")

    def sparsity_at(self, step: int) -> float:
        """The target sparsity after optimizer step ``step``."""
        if step <= self.begin_step:
            return self.initial_sparsity
        if step >= self.end_step:
            return self.final_sparsity
        remaining = 1.0 - (step - self.begin_step) / (self.end_step - self.begin_step)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * remaining**self.power

    def updates_at(self, step: int) -> bool:
        """Whether the masks are recomputed after step ``step``."""
        if step < self.begin_step or step > self.end_step:
            return False
        return step == self.end_step or (step - self.begin_step) % self.frequency == 0


def prunable_layers(model: nn.Module, exclude: Iterable[str] = ()) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs whose ``weight`` magnitude pruning may zero (Linear and Conv).

    Raises:
        ConfigError: when a name in ``exclude`` is not a module of the model.
    """
    excluded = set(exclude)
    names = {name for name, _ in model.named_modules()}
    unknown = sorted(excluded - names)
    if unknown:
        raise ConfigError(f"prune: exclude names unknown module(s) {unknown}")
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, PRUNABLE_TYPES) and name not in excluded
    ]


class MagnitudePruner:
    """Zeroes the smallest-magnitude weights of a model's Linear/Conv layers through masks.

    Masks are ``torch.nn.utils.prune`` masks (the forward uses ``weight_orig * weight_mask``, and
    gradients of masked weights are zero), so fine-tuning continues on the surviving weights.
    Masks only grow: a weight pruned at one update stays pruned at the next.

    Args:
        model: the model, modified in place.
        scope: ``"global"`` (one magnitude threshold over all layers, so layers with many small
            weights lose more) or ``"layer"`` (the same fraction pruned in every layer).
        exclude: module names to leave dense (e.g. the classifier).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        scope: Literal["global", "layer"] = "global",
        exclude: Iterable[str] = (),
    ) -> None:
        if scope not in ("global", "layer"):
            raise ConfigError(f"prune: scope must be 'global' or 'layer'; got {scope!r}")
        self.model = model
        self.scope = scope
        self.layers = prunable_layers(model, exclude)
        if not self.layers:
            raise ConfigError("prune: the model has no Linear or Conv layer to prune")
        for _, module in self.layers:
            if not torch_prune.is_pruned(module):
                torch_prune.identity(module, "weight")
        self.sparsity = 0.0

    @torch.no_grad()
    def set_sparsity(self, sparsity: float) -> None:
        """Recompute the masks so that ``sparsity`` of the prunable weights are zero."""
        if not 0.0 <= sparsity < 1.0:
            raise ConfigError(f"prune: sparsity must be in [0, 1); got {sparsity}")
        # Score the currently effective weights: pruned ones score 0, so they stay pruned.
        scores = [(module.weight_orig * module.weight_mask).abs() for _, module in self.layers]
        if self.scope == "global":
            flat = torch.cat([score.flatten() for score in scores])
            masks = _keep_largest(flat, sparsity).split([score.numel() for score in scores])
            masks = [mask.view_as(score) for mask, score in zip(masks, scores)]
        else:
            masks = [_keep_largest(score.flatten(), sparsity).view_as(score) for score in scores]
        for (_, module), mask in zip(self.layers, masks):
            module.weight_mask.copy_(mask.to(module.weight_mask.dtype))
            # The forward pre-hook refreshes ``weight`` on the next call; do it now too so
            # that reading ``module.weight`` right away shows the new sparsity.
            module.weight = module.weight_orig * module.weight_mask
        self.sparsity = sparsity

    def make_permanent(self) -> None:
        """Fold the masks into the weights and remove the pruning re-parametrisation."""
        for _, module in self.layers:
            if torch_prune.is_pruned(module):
                torch_prune.remove(module, "weight")


def _keep_largest(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """A 0/1 mask over a flat tensor that zeroes exactly ``round(sparsity * n)`` smallest scores."""
    prune_count = int(round(sparsity * scores.numel()))
    mask = torch.ones_like(scores)
    if prune_count > 0:
        smallest = torch.topk(scores, prune_count, largest=False).indices
        mask[smallest] = 0
    return mask


class PolynomialPruningCallback:
    """A trainer callback that raises the sparsity along a :class:`PolynomialSchedule`.

    After every optimizer step (``on_step_end(trainer, metrics)``, step read from
    ``trainer.global_step``) the masks are recomputed when the schedule says so; at the end of
    training (``on_fit_end``) the final sparsity is enforced.
    """

    def __init__(self, pruner: MagnitudePruner, schedule: PolynomialSchedule) -> None:
        self.pruner = pruner
        self.schedule = schedule
        self.history: list[tuple[int, float]] = []

    def on_fit_start(self, *args: Any, **kwargs: Any) -> None:
        self._update(0)

    def on_step_end(self, *args: Any, step: int | None = None, **kwargs: Any) -> None:
        step = _step_from(args, kwargs, step)
        if self.schedule.updates_at(step):
            self._update(step)

    def on_fit_end(self, *args: Any, **kwargs: Any) -> None:
        self._update(self.schedule.end_step)

    def _update(self, step: int) -> None:
        target = self.schedule.sparsity_at(step)
        if not self.history or self.history[-1][1] != target:
            self.pruner.set_sparsity(target)
            self.history.append((step, target))


def _step_from(args: tuple, kwargs: dict, step: int | None) -> int:
    """The global step from a hook's arguments: ``step=``, or a state object with ``.step``."""
    if step is not None:
        return int(step)
    for candidate in (*args, *kwargs.values()):
        for attribute in ("global_step", "step"):
            value = getattr(candidate, attribute, None)
            if isinstance(value, int):
                return value
    raise TypeError("PolynomialPruningCallback.on_step_end: no step number in the hook arguments")


def sparsity_table(model: nn.Module) -> list[dict[str, Any]]:
    """Per-layer sparsity of every Linear/Conv weight: ``{layer, shape, parameters, zeros, sparsity}``.

    Works on dense, masked and structurally pruned models alike (it reads the effective weight).
    """
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, PRUNABLE_TYPES):
            continue
        weight = module.weight.detach()
        zeros = int((weight == 0).sum())
        rows.append(
            {
                "layer": name,
                "shape": list(weight.shape),
                "parameters": weight.numel(),
                "zeros": zeros,
                "sparsity": zeros / max(weight.numel(), 1),
            }
        )
    return rows


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(parameters, non-zero parameters)`` of a float model (quantized weights included)."""
    total = nonzero = 0
    for tensor in _weight_tensors(model):
        total += tensor.numel()
        try:
            nonzero += int(torch.count_nonzero(tensor))
        except NotImplementedError:  # torchao's int8 tensor subclasses: count the dequantized values
            nonzero += int(torch.count_nonzero(tensor.dequantize()))
    return total, nonzero


def _weight_tensors(model: nn.Module) -> Iterable[torch.Tensor]:
    """The parameters of a model, including the packed int8 weights of quantized modules."""
    seen: set[int | str] = set()
    for name, value in model.state_dict().items():
        tensors: Sequence[Any]
        if isinstance(value, torch.Tensor):
            tensors = [value]
        elif isinstance(value, tuple):  # quantized Linear packs (weight, bias)
            tensors = [item for item in value if isinstance(item, torch.Tensor)]
        else:
            continue
        for tensor in tensors:
            if name.endswith(("running_mean", "running_var", "num_batches_tracked", "weight_mask")):
                continue
            if name.endswith(("scale", "zero_point")) and tensor.numel() == 1:
                continue
            if tensor.is_quantized:
                tensor = tensor.int_repr()
            # Tied weights share storage and are counted once; tensor subclasses report
            # a data pointer of 0, so they are told apart by name instead.
            pointer = tensor.data_ptr() if tensor.numel() else 0
            key = pointer if pointer else name
            if key in seen:
                continue
            seen.add(key)
            yield tensor


# ---------------------------------------------------------------------------------------------
# Structured pruning


@dataclass
class StructuredPruneResult:
    """What structured pruning removed.

    Attributes:
        parameters_before, parameters_after: parameter counts.
        macs_before, macs_after: multiply-accumulates of one forward pass at the example input.
        pruned_heads: attention heads removed per attention module (transformers only).
    """

    parameters_before: int
    parameters_after: int
    macs_before: int
    macs_after: int
    pruned_heads: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def output_layers(model: nn.Module, num_classes: int | None = None) -> list[nn.Module]:
    """The layers whose output width is the task's (the classifier), which must keep it.

    The last Linear (or Conv) of the model, and any Linear with ``num_classes`` outputs.
    """
    layers = [module for module in model.modules() if isinstance(module, PRUNABLE_TYPES)]
    keep = [layers[-1]] if layers else []
    if num_classes:
        keep += [module for module in layers if isinstance(module, nn.Linear) and module.out_features == num_classes]
    return list({id(module): module for module in keep}.values())


def structured_prune(
    model: nn.Module,
    example_inputs: Any,
    *,
    ratio: float = 0.5,
    importance: Literal["l1", "l2", "random"] = "l2",
    global_pruning: bool = False,
    heads: bool = True,
    num_classes: int | None = None,
    ignored_layers: Sequence[nn.Module] = (),
    round_to: int | None = None,
) -> StructuredPruneResult:
    """Remove a fraction of the channels (and attention heads) of a model, in place.

    Torch-Pruning builds the dependency graph of the model from one forward pass on
    ``example_inputs``, so that removing an output channel of a convolution also removes the
    matching BatchNorm channel and input channel of the next layer; the result is a smaller dense
    model that needs no special kernel to be faster.

    Args:
        model: the model (eval or train mode); modified in place.
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
        ratio: fraction of channels removed from each prunable group (0 < ratio < 1).
        importance: channel score: L2 or L1 norm of the weights, or random (a baseline).
        global_pruning: rank channels across layers instead of the same ratio in each.
        heads: for transformer attention (modules with ``num_attention_heads`` and
            query/key/value Linears), prune whole heads rather than head dimensions.
        num_classes: the task's class count, whose output layer is kept whole.
        ignored_layers: more modules to leave untouched.
        round_to: keep channel counts a multiple of this (tensor-core friendly widths).

    Returns:
        A :class:`StructuredPruneResult`.

    Raises:
        ConfigError: on a ratio outside (0, 1) or a model Torch-Pruning cannot trace.
    """
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"prune: structured ratio must be in (0, 1); got {ratio}")
    tp = require("torch_pruning", extra="compress", purpose="structured pruning")
    importances = {
        "l1": lambda: tp.importance.MagnitudeImportance(p=1),
        "l2": lambda: tp.importance.MagnitudeImportance(p=2),
        "random": tp.importance.RandomImportance,
    }
    if importance not in importances:
        raise ConfigError(f"prune: importance must be one of {sorted(importances)}; got {importance!r}")
    ignored = list(ignored_layers) + output_layers(model, num_classes)
    num_heads, attention_modules = _attention_heads(model) if heads else ({}, [])
    macs_before, params_before = _count_ops(tp, model, example_inputs)
    try:
        pruner = tp.pruner.MetaPruner(
            model,
            example_inputs,
            importance=importances[importance](),
            pruning_ratio=ratio,
            global_pruning=global_pruning,
            ignored_layers=ignored,
            round_to=round_to,
            num_heads=num_heads,
            prune_head_dims=False if num_heads else True,
            prune_num_heads=bool(num_heads),
            head_pruning_ratio=ratio if num_heads else 0.0,
        )
        pruner.step()
    except (RuntimeError, ValueError, TypeError, AttributeError) as error:
        raise ConfigError(f"prune: structured pruning could not trace the model: {error}") from None
    pruned_heads = _update_attention_modules(attention_modules, num_heads)
    macs_after, params_after = _count_ops(tp, model, example_inputs)
    return StructuredPruneResult(params_before, params_after, macs_before, macs_after, pruned_heads)


def _count_ops(tp: Any, model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    model.train(was_training)
    return int(macs), int(params)


def _attention_heads(model: nn.Module) -> tuple[dict[nn.Module, int], list[tuple[str, nn.Module]]]:
    """``{query/key/value Linear: heads}`` for HF-style self-attention modules, and those modules."""
    num_heads: dict[nn.Module, int] = {}
    modules = []
    for name, module in model.named_modules():
        heads = getattr(module, "num_attention_heads", None)
        projections = [getattr(module, part, None) for part in ("query", "key", "value")]
        if isinstance(heads, int) and all(isinstance(p, nn.Linear) for p in projections):
            for projection in projections:
                num_heads[projection] = heads
            modules.append((name, module))
    return num_heads, modules


def _update_attention_modules(modules: list[tuple[str, nn.Module]], num_heads: dict[nn.Module, int]) -> dict[str, int]:
    """Tell each attention module its new head count and width after heads were removed."""
    pruned = {}
    for name, module in modules:
        head_size = module.attention_head_size
        remaining = module.query.out_features // head_size
        pruned[name] = module.num_attention_heads - remaining
        module.num_attention_heads = remaining
        module.all_head_size = remaining * head_size
    return pruned


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Any], *, max_batches: int = 50) -> int:
    """Re-estimate BatchNorm running statistics from training batches (after structured pruning).

    Removing channels changes the statistics every later BatchNorm sees; a few forward passes in
    train mode with a cumulative average (``momentum=None``) fix them without any gradient step.

    Args:
        model: the model; its BatchNorm layers are reset and re-estimated.
        batches: batches in a form :func:`tightfit.step.loss.split_batch` accepts.
        max_batches: how many batches to use at most.

    Returns:
        The number of batches used (0 when the model has no BatchNorm).
    """
    from tightfit.step.loss import split_batch

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    was_training = model.training
    model.train()
    used = 0
    for batch in batches:
        if used >= max_batches:
            break
        args, kwargs, _ = split_batch(batch)
        model(*args, **kwargs)
        used += 1
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.train(was_training)
    return used


# ---------------------------------------------------------------------------------------------
# The one-call API


@dataclass
class PruneResult:
    """What :func:`prune` did: the model, the per-layer sparsity table and method details."""

    model: nn.Module
    method: str
    table: list[dict[str, Any]]
    details: dict[str, Any]


def prune(
    model: nn.Module,
    data: Any = None,
    *,
    method: Literal["magnitude", "structured"] = "magnitude",
    sparsity: float = 0.5,
    scope: Literal["global", "layer"] = "global",
    schedule: PolynomialSchedule | None = None,
    exclude: Iterable[str] = (),
    example_inputs: Any = None,
    num_classes: int | None = None,
    importance: Literal["l1", "l2", "random"] = "l2",
    finetune: Any = None,
    run_dir: Any = None,
    progress: bool = False,
) -> PruneResult:
    """Prune a model (in place) and, given data, fine-tune it through the trainer.

    Args:
        model: the trained model.
        data: a ``DataBundle`` or ``(train, val, test)`` tuple; without it the pruning is
            one-shot and nothing is fine-tuned (and BatchNorm is not re-calibrated).
        method: ``magnitude`` (unstructured zeros) or ``structured`` (channels/heads removed).
        sparsity: final fraction of weights zeroed (magnitude) or channels removed (structured).
        scope: magnitude only: ``global`` or ``layer`` (see :class:`MagnitudePruner`).
        schedule: magnitude only: the sparsity schedule during fine-tuning (default: polynomial
            from 0 to ``sparsity`` over the first two thirds of the fine-tuning steps); when
            given, its ``final_sparsity`` is the target and ``sparsity`` is ignored.
        exclude: magnitude only: module names left dense.
        example_inputs: structured only: one forward call's inputs, for the dependency graph.
        num_classes: structured only: the classifier width to keep.
        importance: structured only: channel score (``l1``, ``l2``, ``random``).
        finetune: a :class:`tightfit.compression.training.FinetuneSettings` (default: 3 epochs).
        run_dir: the trainer's run directory.
        progress: show the trainer's progress.

    Returns:
        A :class:`PruneResult` (the masks are made permanent).

    Raises:
        ConfigError: on a bad method, sparsity or scope.

    Example:
        >>> result = prune(model, bundle, method="magnitude", sparsity=0.5)
        >>> result.table[0]["sparsity"]
    """
    from tightfit.compression.training import FinetuneSettings
    from tightfit.compression.training import finetune as run_finetune

    settings = finetune or FinetuneSettings()
    details: dict[str, Any] = {}
    if method == "magnitude":
        pruner = MagnitudePruner(model, scope=scope, exclude=exclude)
        if data is None:
            pruner.set_sparsity(sparsity)
        else:
            if schedule is None:
                steps = settings.planned_steps(len(_train_split(data)))
                end = max(1, (2 * steps) // 3)
                schedule = PolynomialSchedule(0.0, sparsity, 0, end, frequency=max(1, end // 10))
            callback = PolynomialPruningCallback(pruner, schedule)
            run_finetune(model, data, settings, callbacks=[callback], run_dir=run_dir, progress=progress)
            details["schedule"] = {**schedule.__dict__, "updates": callback.history}
        pruner.make_permanent()
        details["scope"] = scope
    elif method == "structured":
        if example_inputs is None:
            raise ConfigError("prune: structured pruning needs example inputs (one batch)")
        result = structured_prune(model, example_inputs, ratio=sparsity, importance=importance, num_classes=num_classes)
        details.update(result.to_dict())
        if data is not None:
            loader = torch.utils.data.DataLoader(
                _train_split(data),
                batch_size=settings.batch_size,
                shuffle=True,
                collate_fn=getattr(data, "collate_fn", None),
            )
            details["batchnorm_batches"] = recalibrate_batchnorm(model, loader)
            run_finetune(model, data, settings, run_dir=run_dir, progress=progress)
    else:
        raise ConfigError(f"prune: method must be 'magnitude' or 'structured'; got {method!r}")
    return PruneResult(model, method, sparsity_table(model), details)


def _train_split(data: Any) -> Any:
    return data.train if hasattr(data, "train") else data[0]
