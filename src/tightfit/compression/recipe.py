"""The compression recipe: which steps, in which order, and how the result is measured.

A recipe is YAML (``recipes/compress-digits.yaml``) or the equivalent dict::

    steps:
      - step: prune            # magnitude (unstructured) or structured, with fine-tuning
        method: magnitude
        sparsity: 0.5
      - step: quantize         # auto: by model type and by what measures faster here
        method: auto
      - step: export           # ONNX fp32 + ONNX Runtime int8, verified against PyTorch
    tolerance: 1.0             # metric points a step may lose before it is flagged

Unknown keys are errors that name the key, the file and the closest valid key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError

from tightfit.errors import ConfigError
from tightfit.names import OPTIMIZERS, QUANTIZE_METHODS
from tightfit.settings import closest, describe_validation_error, read_yaml
from tightfit.trust import check_spec_from_file

STEP_NAMES = ("prune", "finetune", "distill", "qat", "quantize", "export")


class FinetuneConfig(BaseModel, extra="forbid", allow_inf_nan=False):
    """Fine-tuning inside a step (through the trainer)."""

    epochs: int = Field(default=3, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    optimizer: Literal[OPTIMIZERS] = "adamw"
    batch_size: int = Field(default=64, ge=1)
    weight_decay: float = Field(default=0.0, ge=0)


class PruneStep(BaseModel, extra="forbid", allow_inf_nan=False):
    """Unstructured magnitude pruning on a polynomial schedule, or structured channel/head pruning."""

    step: Literal["prune"]
    method: Literal["magnitude", "structured"] = "magnitude"
    sparsity: float = Field(default=0.5, gt=0, lt=1, description="final share of weights zeroed / channels removed")
    scope: Literal["global", "layer"] = "global"
    initial_sparsity: float = Field(default=0.0, ge=0, lt=1)
    begin_step: int = Field(default=0, ge=0)
    end_step: int | None = Field(default=None, ge=1, description="default: two thirds of the fine-tuning steps")
    frequency: int | None = Field(default=None, ge=1, description="steps between mask updates; default end_step/10")
    exclude: list[str] = Field(default_factory=list, description="module names left dense")
    importance: Literal["l1", "l2", "random"] = "l2"
    finetune: FinetuneConfig | None = Field(default=None, description="default: the recipe's finetune")


class FinetuneStep(FinetuneConfig):
    """Plain fine-tuning of the current model."""

    step: Literal["finetune"]


class DistillStep(BaseModel, extra="forbid", allow_inf_nan=False):
    """Distillation of the current model (student) from a teacher."""

    step: Literal["distill"]
    teacher: str = Field(default="original", description="original (the source model), a run directory or a model spec")
    teacher_checkpoint: str | None = Field(default=None, description="safetensors weights for a teacher model spec")
    temperature: float = Field(default=4.0, gt=0)
    alpha: float = Field(default=0.7, ge=0, le=1, description="weight of the teacher's term")
    finetune: FinetuneConfig | None = None


class QatStep(BaseModel, extra="forbid", allow_inf_nan=False):
    """Quantization-aware fine-tuning, then conversion to int8."""

    step: Literal["qat"]
    finetune: FinetuneConfig = Field(default_factory=lambda: FinetuneConfig(epochs=1, lr=1e-4))


class QuantizeStep(BaseModel, extra="forbid", allow_inf_nan=False):
    """Post-training int8 quantization."""

    step: Literal["quantize"]
    method: Literal[QUANTIZE_METHODS] = "auto"
    calibration_batches: int = Field(default=32, ge=1, description="static: training batches for activation ranges")


class ExportStep(BaseModel, extra="forbid", allow_inf_nan=False):
    """ONNX export (dynamic batch) and ONNX Runtime int8, each verified before it is kept."""

    step: Literal["export"]
    onnx: bool = True
    int8: Literal["auto", "static", "dynamic", "none"] = Field(
        default="auto", description="auto: static for CNNs, dynamic for Linear-heavy models"
    )
    program: bool = Field(default=True, description="also save a torch.export program (.pt2)")
    max_abs_diff: float = Field(default=1e-3, gt=0, description="fp32 ONNX: largest difference / output scale")
    min_top1_agreement: float = Field(default=0.99, ge=0, le=1, description="fp32 ONNX vs PyTorch")
    int8_min_top1_agreement: float = Field(default=0.95, ge=0, le=1, description="ONNX int8 vs PyTorch")
    calibration_batches: int = Field(default=32, ge=1)


Step = Annotated[
    PruneStep | FinetuneStep | DistillStep | QatStep | QuantizeStep | ExportStep,
    Field(discriminator="step"),
]


def _default_steps() -> list[Any]:
    # seed-001's order: prune (with fine-tuning) -> quantize -> export for deployment.
    return [PruneStep(step="prune"), QuantizeStep(step="quantize"), ExportStep(step="export")]


class Recipe(BaseModel, extra="forbid", allow_inf_nan=False):
    """A compression recipe: the steps and how every artifact is measured."""

    steps: list[Step] = Field(default_factory=_default_steps)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="default fine-tuning of steps")
    tolerance: float = Field(default=1.0, ge=0, description="metric loss (accuracy points) before a step is flagged")
    threads: int | None = Field(default=None, ge=1, description="latency threads; default torch's (physical cores)")
    latency_batch_size: int = Field(default=64, ge=2, description="the larger batch latency is measured at")
    warmup: int = Field(default=10, ge=1)
    repeats: int = Field(default=50, ge=5)
    device: str = Field(default="cpu", description="where fine-tuning runs; measurement is always on CPU")
    seed: int = 0


def build_recipe(tree: Any, *, source: str = "(Python dict)") -> Recipe:
    """Validate a recipe tree (dict) into a :class:`Recipe`.

    Raises:
        ConfigError: naming every bad key and where.
    """
    if tree is None:
        tree = {}
    if isinstance(tree, Recipe):
        return tree
    if not isinstance(tree, dict):
        raise ConfigError(f"recipe {source}: expected a mapping of settings, got {type(tree).__name__}")
    try:
        return Recipe.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(f"recipe {source}: {describe_validation_error(error, Recipe)}") from None


def load_recipe(path: str | Path | None, *, trust_code: bool = False) -> Recipe:
    """Read a recipe YAML file (``None``: the default recipe).

    Args:
        path: the recipe file.
        trust_code: let a distillation teacher be a ``module.path:callable`` spec (``--trust-code``).

    Raises:
        ConfigError: the file is missing, is not YAML, or has bad keys, or a teacher spec would
            run Python code without ``trust_code``.
    """
    if path is None:
        return Recipe()
    recipe = build_recipe(read_yaml(path, what="recipe"), source=str(path))
    for index, step in enumerate(recipe.steps):
        if isinstance(step, DistillStep):
            check_spec_from_file(step.teacher, where=f"recipe {path}: steps[{index}].teacher", trust_code=trust_code)
    return recipe


def steps_from_names(names: str) -> list[dict[str, Any]]:
    """``"prune,quantize,export"`` -> step dicts with default settings.

    Raises:
        ConfigError: on an unknown step name (with the closest valid one).
    """
    steps = []
    for name in (part.strip() for part in names.split(",")):
        if name not in STEP_NAMES:
            raise ConfigError(
                f"--steps: unknown step {name!r}{closest(name, STEP_NAMES)} (valid: {', '.join(STEP_NAMES)})"
            )
        steps.append({"step": name})
    return steps
