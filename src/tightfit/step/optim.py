"""Optimizers by name, shared by the trainer and the memory engine.

Names: ``sgd`` (plain, or with ``momentum``/``nesterov``), ``sgd-momentum`` (momentum 0.9),
``adam``, ``adamw``, ``adam8bit`` (bitsandbytes' 8-bit AdamW: CUDA and CPU, not MPS).
"""

from collections.abc import Iterable

import torch

from tightfit._optional import import_bitsandbytes, require
from tightfit.errors import ConfigError
from tightfit.names import OPTIMIZERS

OPTIMIZER_DEVICES = {"adam8bit": ("cuda", "cpu")}  # bitsandbytes registers no 8-bit optimizer kernel for MPS


def check_optimizer_device(name: str, device_type: str) -> None:
    """Refuse, in one line, an optimizer that does not run on ``device_type`` (a run's or a plan's target).

    Raises:
        ConfigError: naming the optimizer, the device and what runs there instead.
    """
    devices = OPTIMIZER_DEVICES.get(name)
    if devices is not None and device_type not in devices:
        raise ConfigError(
            f"optimizer.name: {name} (bitsandbytes' 8-bit AdamW) does not run on {device_type}; use adamw "
            f"(it runs on {', '.join(devices)})"
        )


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
        return torch.optim.SGD(
            trainable, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, foreach=foreach
        )
    if name == "adam":
        return torch.optim.Adam(trainable, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach)
    if name == "adamw":
        return torch.optim.AdamW(trainable, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach)
    if name == "adam8bit":
        require("bitsandbytes", extra="gpu", purpose="8-bit Adam")
        bitsandbytes = import_bitsandbytes()
        return bitsandbytes.optim.AdamW8bit(trainable, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ConfigError(f"optimizer.name: unknown optimizer {name!r} (choose from {', '.join(OPTIMIZERS)})")
