"""Activation checkpointing of repeated blocks, without editing the model's code.

A checkpointed block keeps only its inputs during the forward pass and recomputes its internals
during backward: activation memory drops from the sum over all blocks to roughly one block plus
the block boundaries, for about one extra forward pass of compute.

:func:`find_repeated_blocks` finds the blocks worth checkpointing (transformer layers, ResNet stage
blocks); :func:`apply_activation_checkpointing` makes their ``forward`` run through
``torch.utils.checkpoint.checkpoint(use_reentrant=False)``. It swaps each block's class for a
subclass whose ``forward`` does that, so parameter names, ``state_dict`` keys, hooks and
``copy.deepcopy`` are all unchanged.
"""

import difflib
from collections import defaultdict

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tightfit.errors import ConfigError


class _CheckpointedForward:
    """Mixin placed before the block's own class: its forward recomputes the block in backward."""

    _tightfit_checkpointed = True

    def forward(self, *args, **kwargs):
        # Without autograd (evaluation, inference) there is nothing to save, so run it plainly.
        if not torch.is_grad_enabled():
            return super().forward(*args, **kwargs)
        return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)


_CHECKPOINTED_CLASSES: dict[type, type] = {}

# A second class of repeated blocks beside the heaviest one is checkpointed too when its runs hold
# at least this share of the heaviest class's parameters.
_MIN_SHARE_OF_BEST = 0.25


def _nested(inner: str, outer: str) -> bool:
    """Whether module ``inner`` lies inside module ``outer`` (names as in ``named_modules``)."""
    return inner.startswith(outer + ".")


def _checkpointed_class(cls: type) -> type:
    if cls not in _CHECKPOINTED_CLASSES:
        _CHECKPOINTED_CLASSES[cls] = type(
            f"Checkpointed{cls.__name__}", (_CheckpointedForward, cls), {"__module__": cls.__module__}
        )
    return _CHECKPOINTED_CLASSES[cls]


def _is_composite(module: nn.Module) -> bool:
    """A block made of layers (a transformer layer, a residual block), not a single layer."""
    return any(True for _ in module.children())


def find_repeated_blocks(model: nn.Module) -> list[str]:
    """Names of the repeated blocks of a model: transformer layers, ResNet stage blocks.

    Inside every ``nn.ModuleList`` / ``nn.Sequential``, runs of two or more consecutive children
    of the same composite class are candidates. Of the candidate classes, the one whose runs hold
    the most parameters wins, and all of its blocks are returned (e.g. the 16 ``Bottleneck``
    blocks of ResNet-50's four stages, the 12 ``BertLayer`` of BERT-base). Classes beside it (not
    nested in or around its blocks) holding at least a quarter of its parameters join it: a
    diffusers UNet gets both its ``ResnetBlock2D`` and its ``Transformer2DModel`` blocks. Works on
    meta models.

    Returns:
        Module names (as in ``model.named_modules()``), in model order; empty when the model
        has no repeated blocks.
    """
    blocks_by_class: dict[type, list[str]] = defaultdict(list)
    parameters_by_class: dict[type, int] = defaultdict(int)
    for container_name, container in model.named_modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(container.named_children())
        start = 0
        while start < len(children):
            cls = type(children[start][1])
            end = start
            while end + 1 < len(children) and type(children[end + 1][1]) is cls:
                end += 1
            run = children[start : end + 1]
            if len(run) >= 2 and _is_composite(run[0][1]):
                for child_name, child in run:
                    blocks_by_class[cls].append(f"{container_name}.{child_name}" if container_name else child_name)
                    parameters_by_class[cls] += sum(parameter.numel() for parameter in child.parameters())
            start = end + 1
    if not blocks_by_class:
        return []
    by_weight = sorted(
        blocks_by_class, key=lambda cls: (parameters_by_class[cls], len(blocks_by_class[cls])), reverse=True
    )
    best = by_weight[0]
    chosen = set(blocks_by_class[best])
    # Other classes of blocks that sit beside the winner, neither inside nor around its blocks, join
    # it when they carry a real share of the weights: a diffusers UNet repeats both its ResNet
    # blocks and its attention transformers. Blocks nested in the winner's (experts inside a
    # transformer layer) or enclosing them (a whole UNet down-block) stay out.
    for cls in by_weight[1:]:
        if parameters_by_class[cls] < _MIN_SHARE_OF_BEST * parameters_by_class[best]:
            break
        names = blocks_by_class[cls]
        if not any(_nested(name, other) or _nested(other, name) for name in names for other in chosen):
            chosen.update(names)
    # A winning class nested inside another winning block (Sequential of Sequentials) would be
    # checkpointed twice; keep the outermost.
    outermost = {name for name in chosen if not any(name.startswith(other + ".") for other in chosen)}
    return [name for name, _ in model.named_modules() if name in outermost]


def apply_activation_checkpointing(model: nn.Module, targets: str | list[str] = "auto") -> list[str]:
    """Checkpoint the activations of blocks of ``model``, in place.

    Args:
        model: the model; its code is not edited.
        targets: ``"auto"`` for :func:`find_repeated_blocks`, or a list of module names.

    Returns:
        The names of the blocks now checkpointed (already-checkpointed blocks included); empty
        when ``"auto"`` finds no repeated blocks.

    Raises:
        ConfigError: for a name that is not a module of the model (naming the closest one),
            or a ``targets`` value that is neither ``"auto"`` nor a list of names.

    Example:
        >>> apply_activation_checkpointing(model)            # all transformer layers
        ['encoder.layer.0', 'encoder.layer.1', ...]
    """
    if targets == "auto":
        names = find_repeated_blocks(model)
    elif isinstance(targets, (list, tuple)) and all(isinstance(name, str) for name in targets):
        names = list(targets)
    else:
        raise ConfigError(f"checkpointing: expected 'auto' or a list of module names, got {targets!r}")
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules or name == "":
            close = difflib.get_close_matches(name, [key for key in modules if key], n=1, cutoff=0.4)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"checkpointing: the model has no module named {name!r}{hint}")
    for name in names:
        module = modules[name]
        if not getattr(module, "_tightfit_checkpointed", False):
            module.__class__ = _checkpointed_class(type(module))
    disable_kv_cache(model)
    return names


def disable_kv_cache(model: nn.Module) -> bool:
    """Turn off the key/value cache of transformers models, as ``gradient_checkpointing_enable`` does.

    A checkpointed block's recomputed forward would append its keys and values to the cache a
    second time: the attention then sees twice the keys, and tracing fails on the shapes.
    :func:`apply_activation_checkpointing` calls it, and the memory engine calls it again for models
    checkpointed before they reach it.

    Returns:
        Whether some module's ``config.use_cache`` was on.
    """
    if not any(getattr(module, "_tightfit_checkpointed", False) for module in model.modules()):
        return False
    changed = False
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", False) is True:
            config.use_cache = False
            changed = True
    return changed
