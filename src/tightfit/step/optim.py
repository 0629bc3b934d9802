"""Optimizers by name, shared by the trainer and the memory engine.

Names: ``sgd`` (plain, or with ``momentum``/``nesterov``), ``sgd-momentum`` (momentum 0.9),
``adam``, ``adamw``, ``adam8bit`` (bitsandbytes' 8-bit AdamW, CUDA only).
"""

from collections.abc import Iterable

import torch

from tightfit._optional import require
from tightfit.errors import ConfigError
from tightfit.names import OPTIMIZERS


def build_optimizer(
    name: str,
    parameters: Iterable[torch.nn.Parameter],
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    nesterov: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    foreach: bool | None = None,
) -> torch.optim.Optimizer:
    """Build an optimizer by name over the parameters that require gradients.

    ``foreach`` picks the multi-tensor kernels (None: torch's default for the parameters' device,
    True on CUDA). The memory estimator sets it for a CUDA target: its fake parameters live on the
    CPU, where torch's default is the one-tensor-at-a-time loop, whose temporaries are smaller.

    Raises:
        ConfigError: for an unknown name or an invalid combination (nesterov without momentum).
    """
    trainable = [parameter for parameter in parameters if parameter.requires_grad]
    if not trainable:
        raise ConfigError("optimizer: the model has no trainable parameters (all are frozen)")
    if name == "sgd-momentum":
        name, momentum = "sgd", momentum or 0.9
    if name == "sgd":
        if nesterov and momentum <= 0:
            raise ConfigError("optimizer.nesterov: Nesterov momentum needs optimizer.momentum > 0")
        return torch.optim.SGD(trainable, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, foreach=foreach)
    if name == "adam":
        return torch.optim.Adam(trainable, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach)
    if name == "adamw":
        return torch.optim.AdamW(trainable, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach)
    if name == "adam8bit":
        bitsandbytes = require("bitsandbytes", extra="gpu", purpose="8-bit Adam")
        return bitsandbytes.optim.AdamW8bit(trainable, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ConfigError(f"optimizer.name: unknown optimizer {name!r} (choose from {', '.join(OPTIMIZERS)})")
