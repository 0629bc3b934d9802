"""Silent training failures, read from the run's own curves (seed-004's debugging chapter).

Three findings, each with its evidence and what to try:

``flat loss`` (during the run, as soon as it is known)
    Over the first ``window`` optimizer steps after the warm-up, a least-squares line is fitted to
    the training loss. The loss is *flat* when the change that line makes over the window is
    smaller than the batch-to-batch noise of the loss (the standard deviation of successive
    differences over the square root of 2, which a trend barely moves) **and** is not a
    significant decrease (t < 3 for the slope), and the loss is not already low: below half of
    the first steps' (a problem solved during the warm-up stays flat at its minimum) or, for a
    classifier, below half the chance level ln(classes) (a fine-tuned model starts converged). A comparison of two
    10-step means (what a
    tolerance on "start vs end" does) cannot work: on digits the mean of 10 batches moves by
    ~0.013 from noise alone, ten times a 0.1 % tolerance, so a loss stuck at 2.34 for 200
    steps at lr 1e-12 never looked flat. Measured on the digits recipe, first 100 steps after
    warm-up: lr 1e-12: change 0.008 against noise 0.042 (flat); lr 1e-5: 0.124 against 0.041
    (moving, slowly); lr 3e-3: 1.67 against 0.038.

``overfitting`` (at the end)
    The validation loss, averaged over three consecutive validations, ends at least 10 % above
    its best such average, the best was not the last, and the training loss kept falling after
    it. (A single best validation is luck as often as skill: the LoRA text recipe's one low
    point, 0.105 at step 75 among values of 0.125-0.136 with the validation accuracy at its best
    throughout, is +29 % on a single point, +8 % on means of three.)

``underfitting`` (at the end)
    The training loss ended above half of where it started (for a classifier: above half the
    chance level, ln(classes)) and the validation loss is within 25 % of it: both high and close
    together, the signature of a model that has not learnt what the data holds (too few steps,
    too low a learning rate, too small a model).

Each finding is a dict ``{"finding", "evidence", "advice"}``; the trainer puts them in the
summary under ``diagnosis`` and the command line prints them.
"""

import math
from typing import Any

import numpy as np

SMOOTHING = 3  # validations averaged before comparing (overfitting)
OVERFIT_RISE = 0.10  # the mean of the last validations must rise 10 % above the best mean
UNDERFIT_FRACTION = 0.5  # the training loss ends above half of its reference (start or chance level)
UNDERFIT_GAP = 0.25  # ... with the validation loss within 25 % of it
FLAT_T = 3.0  # a decrease with t >= 3 is real, however small
RECENT_STEPS = 20  # the summary's train_loss: the mean over the run's last 20 optimizer steps


def flat_loss_finding(
    losses: list[float],
    *,
    first_step: int,
    lr: float,
    base_lr: float | None = None,
    start_loss: float | None = None,
    num_classes: int | None = None,
    batch_note: str | None = None,
) -> dict[str, str] | None:
    """The flat-loss finding for consecutive training losses, or None when the loss moves.

    Args:
        losses: training losses of consecutive optimizer steps (at least 20 finite ones).
        first_step: the optimizer step of ``losses[0]`` (1-based), for the message.
        lr: the learning rate at the last of those steps.
        base_lr: the schedule's base rate, named beside ``lr`` when they differ.
        start_loss: the run's first losses (mean); a window already below half of it has
            learnt already (during the warm-up) and is not called flat.
        num_classes: a classifier's class count; a loss flat below half the chance level
            ``ln(classes)`` has converged (a fine-tuned model) and is not called flat.
        batch_note: how the run's batch came to differ from the recipe's, when it did
            (:func:`batch_advice`); named before the learning rate is suspected.
    """
    values = np.array([loss for loss in losses if math.isfinite(loss)], dtype=np.float64)
    if len(values) < 20:
        return None
    steps = np.arange(len(values), dtype=np.float64)
    slope, intercept = np.polyfit(steps, values, 1)
    change = slope * (len(values) - 1)  # what the trend moves the loss by over the window
    noise = float(np.std(np.diff(values)) / math.sqrt(2))
    residual = values - (intercept + slope * steps)
    slope_error = math.sqrt(float(residual @ residual) / (len(values) - 2) / float(((steps - steps.mean()) ** 2).sum()))
    t_decrease = -slope / slope_error if slope_error > 0 else (math.inf if slope < 0 else 0.0)
    if abs(change) >= noise or t_decrease >= FLAT_T:
        return None
    if start_loss is not None and values.mean() < 0.5 * start_loss:
        return None
    if num_classes and num_classes >= 2 and values.mean() < UNDERFIT_FRACTION * math.log(num_classes):
        return None
    last_step = first_step + len(values) - 1
    rate = (
        f"{lr:.2g}"
        if base_lr is None or math.isclose(base_lr, lr, rel_tol=0.05)
        else f"{base_lr:.2g} ({lr:.2g} at step {last_step})"
    )
    return {
        "finding": "flat loss",
        "evidence": (
            f"the training loss did not move over steps {first_step}-{last_step}: {values[:10].mean():.4g} -> "
            f"{values[-10:].mean():.4g}, "
            f"a trend of {change:+.2g} against a batch-to-batch noise of {noise:.2g} (t = {t_decrease:.1f}) at "
            f"learning rate {rate}"
        ),
        "advice": batch_advice(
            batch_note,
            "the learning rate is likely too low (find one with tightfit lr-find, or set optimizer.lr: auto), or the "
            "labels do not match the inputs",
        ),
    }


def batch_advice(batch_note: str | None, advice: str) -> str:
    """``advice``, preceded by the batch when the run chose one the recipe did not state: a
    changed effective batch changes the steps and the noise of training, and is checked first."""
    if not batch_note:
        return advice
    return (
        f"first check the batch, which the recipe did not set (effective batch from {batch_note}; set "
        f"batch.effective_batch_size); then: {advice}"
    )


def curve_findings(
    history: list[dict[str, float]],
    *,
    start_loss: float | None,
    num_classes: int | None,
    lr: float,
    batch_note: str | None = None,
) -> list[dict[str, str]]:
    """Over- and under-fitting read from the validation history.

    Args:
        history: one record per validation, in order: ``step``, ``train_loss`` (mean training
            loss since the previous validation), ``val_loss``.
        start_loss: the mean training loss of the run's first steps (the reference when the
            chance level is unknown).
        num_classes: the data's class count, or None.
        lr: the base learning rate, for the advice.
        batch_note: see :func:`flat_loss_finding`.
    """
    records = [
        record
        for record in history
        if math.isfinite(record.get("val_loss", math.nan)) and math.isfinite(record.get("train_loss", math.nan))
    ]
    findings = []
    if len(records) >= 2 * SMOOTHING:
        # one low validation is luck as often as skill: compare means of SMOOTHING validations
        means = np.convolve([record["val_loss"] for record in records], np.ones(SMOOTHING) / SMOOTHING, mode="valid")
        best_start = int(np.argmin(means))
        best = records[best_start + SMOOTHING // 2]  # the middle of the best stretch
        latest = records[-1]
        rise = means[-1] / means[best_start] - 1
        if best_start < len(means) - 1 and rise >= OVERFIT_RISE and latest["train_loss"] < best["train_loss"]:
            findings.append(
                {
                    "finding": "overfitting",
                    "evidence": (
                        f"val_loss (mean of {SMOOTHING} validations) rose from {means[best_start]:.4g} around step "
                        f"{best['step']} "
                        f"to {means[-1]:.4g} at step {latest['step']} ({100 * rise:+.0f} %) while train_loss fell from "
                        f"{best['train_loss']:.4g} to {latest['train_loss']:.4g}"
                    ),
                    "advice": (
                        "the best checkpoint (lowest val_loss) is the one tested; early_stopping.enabled=true would "
                        f"stop near step {best['step']}, "
                        "and more data, augmentation, weight_decay or dropout narrow the gap"
                    ),
                }
            )
    if records:
        latest = records[-1]
        if num_classes and num_classes >= 2:
            reference = math.log(num_classes)
            reference_text = (
                f"{UNDERFIT_FRACTION * reference:.3g}, half the chance level ln({num_classes}) = {reference:.3g}"
            )
        elif start_loss is not None and math.isfinite(start_loss) and start_loss > 0:
            reference = start_loss
            reference_text = f"{UNDERFIT_FRACTION * reference:.3g}, half the first steps' loss {reference:.4g}"
        else:
            reference = None
        if (
            reference is not None
            and latest["train_loss"] > UNDERFIT_FRACTION * reference
            and abs(latest["val_loss"] - latest["train_loss"]) <= UNDERFIT_GAP * latest["train_loss"]
        ):
            findings.append(
                {
                    "finding": "underfitting",
                    "evidence": (
                        f"train_loss {latest['train_loss']:.4g} and val_loss {latest['val_loss']:.4g} at step "
                        f"{latest['step']}: "
                        f"both above {reference_text}, and close together"
                    ),
                    "advice": batch_advice(
                        batch_note,
                        f"train longer, with a higher learning rate than {lr:.2g} (tightfit lr-find), or a bigger "
                        "model",
                    ),
                }
            )
    return findings


class TrainingDiagnosis:
    """A callback that watches the curves: the flat-loss check during the run, over- and
    under-fitting at the end (:meth:`conclude`).

    Args:
        flat_loss_steps: the flat-loss window, in optimizer steps after the warm-up (None: off).
        warmup_steps: the schedule's warm-up steps; the flat-loss window starts after them.
        num_classes: the data's class count, or None.
        warn: called with each finding's line as soon as it is found.
        batch_note: how the run's batch differs from what the recipe set, if it does.
    """

    def __init__(
        self,
        flat_loss_steps: int | None,
        warmup_steps: int,
        num_classes: int | None,
        warn: Any = print,
        batch_note: str | None = None,
    ):
        self.flat_loss_steps = flat_loss_steps
        self.warmup_steps = warmup_steps
        self.num_classes = num_classes
        self.warn = warn
        self.batch_note = batch_note
        self.findings: list[dict[str, str]] = []
        self.window: list[float] = []  # the flat-loss window's losses
        self.window_start: int | None = None
        self.flat_checked = False
        self.start_losses: list[float] = []  # the first steps' losses: the reference of "still high"
        self.recent_losses: list[float] = []  # the last RECENT_STEPS losses: the summary's train_loss
        self.interval_loss_sum = 0.0  # training losses since the last validation
        self.interval_steps = 0
        self.history: list[dict[str, float]] = []
        self.last_lr = math.nan
        self.base_lr: float | None = None

    def on_step_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        loss, step = metrics["train_loss"], trainer.global_step
        self.last_lr = metrics["lr"]
        self.base_lr = trainer.optimizer.param_groups[0].get("initial_lr", self.last_lr)
        if metrics.get("skipped") or not math.isfinite(loss):
            return
        if len(self.start_losses) < 10:
            self.start_losses.append(loss)
        self.recent_losses = (self.recent_losses + [loss])[-RECENT_STEPS:]
        self.interval_loss_sum += loss
        self.interval_steps += 1
        if self.flat_loss_steps and not self.flat_checked and step > self.warmup_steps:
            if self.window_start is None:
                self.window_start = step
            self.window.append(loss)
            if len(self.window) >= self.flat_loss_steps:
                self._check_flat()

    def on_validation_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        if "val_loss" not in metrics or not self.interval_steps:
            return
        self.history.append(
            {
                "step": trainer.global_step,
                "train_loss": self.interval_loss_sum / self.interval_steps,
                "val_loss": metrics["val_loss"],
            }
        )
        self.interval_loss_sum, self.interval_steps = 0.0, 0

    def _check_flat(self) -> None:
        self.flat_checked = True
        start_loss = float(np.mean(self.start_losses)) if self.start_losses else None
        finding = flat_loss_finding(
            self.window,
            first_step=self.window_start or 1,
            lr=self.last_lr,
            base_lr=self.base_lr,
            start_loss=start_loss,
            num_classes=self.num_classes,
            batch_note=self.batch_note,
        )
        self.window = []
        if finding is not None:  # news in the middle of a run: said at once, not only in the summary
            self.findings.append(finding)
            self.warn(f"tightfit train: warning: {finding['finding']}: {finding['evidence']}; {finding['advice']}")

    def conclude(self, base_lr: float) -> list[dict[str, str]]:
        """Every finding of the run: the flat-loss one (checked now on a shorter window when the
        run ended first), then over- and under-fitting from the curves (not printed here: the
        summary shows them)."""
        if self.flat_loss_steps and not self.flat_checked and len(self.window) >= 20:
            self._check_flat()
        start_loss = float(np.mean(self.start_losses)) if self.start_losses else None
        return self.findings + curve_findings(
            self.history, start_loss=start_loss, num_classes=self.num_classes, lr=base_lr, batch_note=self.batch_note
        )

    @property
    def recent_train_loss(self) -> float | None:
        """The mean training loss of the last :data:`RECENT_STEPS` steps, or None before any."""
        return float(np.mean(self.recent_losses)) if self.recent_losses else None

    def state_dict(self) -> dict:
        return {
            "findings": self.findings,
            "window": self.window,
            "window_start": self.window_start,
            "flat_checked": self.flat_checked,
            "start_losses": self.start_losses,
            "recent_losses": self.recent_losses,
            "interval_loss_sum": self.interval_loss_sum,
            "interval_steps": self.interval_steps,
            "history": self.history,
            "last_lr": self.last_lr,
            "base_lr": self.base_lr,
        }

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)
