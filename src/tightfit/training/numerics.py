"""The numerics guard: seed-004's debugging checklist, run on every optimizer step.

After the backward pass of a step the guard looks at the loss and the total gradient norm. A
NaN or infinite value skips the step (or stops the run, ``on_nonfinite: stop``) with a message
that names the first parameter whose gradient is not finite, the recent gradient-norm history and
the likely cause. A slower trouble is reported as a warning: no gradient reaching any parameter
(frozen model or a forward pass under ``no_grad``). A loss that does not move is read from the
curves by :mod:`tightfit.training.diagnosis`.
"""

import math
from collections import deque

import torch

from tightfit.errors import TightfitError


class NumericsError(TightfitError):
    """Training produced NaN/Inf values and the configuration says to stop (or too many in a row)."""

    exit_code = 3


def first_nonfinite_gradient(model: torch.nn.Module) -> str | None:
    """The name of the first parameter whose gradient holds a NaN or an infinity, or None."""
    for name, parameter in model.named_parameters():
        if parameter.grad is not None and not torch.isfinite(parameter.grad).all():
            return name
    return None


def likely_cause(loss: float, grad_norms: list[float], clip_grad_norm: float | None, lr: float) -> str:
    """A one-sentence guess at why the loss or gradients stopped being finite."""
    finite_norms = [norm for norm in grad_norms if math.isfinite(norm)]
    if len(finite_norms) >= 3 and finite_norms[-1] > 10 * (sorted(finite_norms)[len(finite_norms) // 2] + 1e-12):
        advice = "set clip_grad_norm (e.g. 1.0)" if clip_grad_norm is None else "lower clip_grad_norm"
        return f"gradients were exploding before the failure: lower the learning rate ({lr:.2g}) or {advice}"
    if not finite_norms and not math.isfinite(loss):
        return (
            "the very first steps diverged: the learning rate "
            f"({lr:.2g}) is likely too high, or the inputs contain NaN/Inf (check the data and its normalisation)"
        )
    if not math.isfinite(loss):
        return f"the loss overflowed: learning rate ({lr:.2g}) too high, or log/divide of zero in the loss"
    return "a gradient overflowed: try clip_grad_norm, a lower learning rate, or bf16 instead of fp16"


class NumericsGuard:
    """Checks every step for NaN/Inf and missing gradients.

    Args:
        on_nonfinite: ``skip`` the step (the default) or ``stop`` the run.
        max_consecutive_skips: stop anyway after this many skipped steps in a row.
        history: how many recent gradient norms to keep for the diagnosis.
    """

    def __init__(self, on_nonfinite: str = "skip", max_consecutive_skips: int = 10, history: int = 8):
        self.on_nonfinite = on_nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.grad_norms: deque[float] = deque(maxlen=history)
        self.consecutive_skips = 0
        self.skipped_steps = 0
        self.warnings: list[str] = []
        self.reported_no_gradient = False

    def check(
        self, model: torch.nn.Module, loss: float, grad_norm: float, *, lr: float, clip_grad_norm: float | None
    ) -> str | None:
        """Inspect one step; returns a message when the step must be skipped, None when it is fine.

        Raises:
            NumericsError: when the step is not finite and the guard is set to stop, or after
                ``max_consecutive_skips`` skipped steps in a row.
        """
        history = [round(norm, 4) for norm in self.grad_norms]
        self.grad_norms.append(grad_norm)
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.consecutive_skips = 0
            self._watch_gradient_flow(model, grad_norm)
            return None
        self.skipped_steps += 1
        self.consecutive_skips += 1
        culprit = first_nonfinite_gradient(model)
        where = f"first non-finite gradient in {culprit!r}" if culprit else "gradients finite"
        message = (
            f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} (loss={loss}, "
            f"grad_norm={grad_norm}); "
            f"{where}; recent grad norms {history}; likely cause: "
            f"{likely_cause(loss, history, clip_grad_norm, lr)}"
        )
        if self.on_nonfinite == "stop":
            raise NumericsError(f"numerics: {message}")
        if self.consecutive_skips >= self.max_consecutive_skips:
            raise NumericsError(f"numerics: {self.consecutive_skips} steps in a row skipped; last: {message}")
        return message

    def _watch_gradient_flow(self, model: torch.nn.Module, grad_norm: float) -> None:
        if grad_norm == 0.0 and not self.reported_no_gradient:
            self.reported_no_gradient = True
            trainable = sum(parameter.requires_grad for parameter in model.parameters())
            self._warn(
                "no gradient reached the parameters (total norm 0): "
                + (
                    "every parameter is frozen"
                    if not trainable
                    else "is the forward pass under torch.no_grad(), or the output detached?"
                )
            )

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        print(f"tightfit train: warning: {message}")

    def state_dict(self) -> dict:
        return {"grad_norms": list(self.grad_norms), "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.grad_norms.extend(state["grad_norms"])
        self.skipped_steps = state["skipped_steps"]
