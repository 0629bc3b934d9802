"""One way to prepare a model: for every shipped training recipe, the module the planner plans and
the module the trainer trains have the same parameter names, dtypes and trainable set.

The trainer's module is built without fitting: the same ``build_run_model`` + ``prepare_model``
call ``Trainer.setup`` makes, with the recipe's config, on the CPU. The planner's module is the one
``tightfit plan RECIPE`` estimates (``plan.planner._Planner``, on meta), cast to the precision's
parameter dtype as the estimator casts it. The 7B recipe is compared on meta only: its planner
module against a planning build of the same config.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tightfit.config import load_config
from tightfit.models.prepare import prepare_model
from tightfit.models.qlora import resolve_quantize_base
from tightfit.models.spec import build_model_for_data
from tightfit.plan.planner import _Planner
from tightfit.plan.run_plan import input_spec_for
from tightfit.runs.model import build_run_model
from tightfit.step.precision import parameter_dtype, resolve_precision
from tightfit.training.trainer import preparation

pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml")) + sorted((ROOT / "src/tightfit/recipes").glob("*.yaml"))
NOT_TRAINING = {"compress-digits.yaml": "a compression recipe: its model is a trained run folder, not a spec"}
# the 7B bases ship as an architecture only (no weights): compared with a planning build
META_ONLY = {"qlora-7b.yaml", "qlora-7b-rtx3050-laptop-6gb.yaml"}


def _config(recipe: Path):
    config = load_config(recipe, ["device=cpu"])
    folder = config.model.partition(":")[2]
    if config.model.startswith("diffusion:") and not (ROOT / folder).is_dir():
        pytest.skip(f"{recipe.name}: the Stable Diffusion weights ({folder}) are not in this checkout")
    return config


def _trainer_base(config, num_classes):
    """The base ``Trainer.setup`` builds (``build_run_model``); without the recipe's stage-1
    ``init_weights`` in this checkout, the same build without loading them (weights change values,
    not names, dtypes or what trains)."""
    stage_one_missing = config.init_weights and not (ROOT / config.init_weights).exists()
    # the LoRA recipe takes stage 1's run on the command line (init_weights=); without it the
    # trainer refuses a weightless base, so the same build is made without loading any
    if stage_one_missing or (config.lora is not None and config.init_weights is None):
        return build_model_for_data(config.model, config.model_options, num_classes=num_classes, input_shape=None)[0]
    return build_run_model(config, num_classes=num_classes)[0]


def _planner(config) -> _Planner:
    """The planner ``plan_run`` makes for ``config`` on the CPU (the run this test builds)."""
    from tightfit.hardware.profiles import resolve_target

    profile = resolve_target("cpu", None)
    input_spec, num_classes = input_spec_for(config)
    quantize_base = None
    if config.lora is not None and config.lora.quantize_base is not None:
        quantize_base = resolve_quantize_base(config.lora.quantize_base, "cpu").method
    model_kwargs = dict(config.model_options, **({"num_classes": num_classes} if num_classes is not None else {}))
    return _Planner(
        config.model,
        input_spec,
        profile,
        lora_rank=None,
        model_kwargs=model_kwargs,
        quantize_base=quantize_base,
        lora=config.lora,
    )


def _shape(module: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, tuple[torch.dtype, bool]]:
    """Parameter name -> (dtype, trainable); a quantized base's frozen weights are left out (the
    planner counts their bytes instead of building them)."""
    return {
        name: (dtype or parameter.dtype, parameter.requires_grad)
        for name, parameter in module.named_parameters()
        if parameter.is_floating_point() or parameter.requires_grad
    }


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.name)
def test_the_planned_module_is_the_module_the_trainer_trains(recipe: Path):
    if recipe.name in NOT_TRAINING:
        pytest.skip(NOT_TRAINING[recipe.name])
    config = _config(recipe)
    precision, _ = resolve_precision(config.precision, "cpu")
    planner = _planner(config)
    planned = planner.model_for(bool(config.checkpointing.activation))
    cast = parameter_dtype(precision) if precision == "bf16-pure" else None
    if recipe.name in META_ONLY:
        settings = preparation(config, precision, torch.device("meta"))
        run = prepare_model(
            config.model,
            model_kwargs=config.model_options,
            for_planning=True,
            device_type="cpu",
            **{key: value for key, value in settings.items() if key != "device"},
        ).module
    else:
        _, num_classes = input_spec_for(config)
        base = _trainer_base(config, num_classes)
        run = prepare_model(base, **preparation(config, precision, torch.device("cpu"))).module
    assert all(parameter.is_meta for parameter in planned.parameters())
    planned_shape, run_shape = _shape(planned, cast), _shape(run)
    assert planned_shape.keys() == run_shape.keys()
    assert planned_shape == run_shape
    trainable = {name for name, (_, grad) in run_shape.items() if grad}
    assert trainable, f"{recipe.name}: nothing trains"
    if config.lora is not None:
        assert len(trainable) < len(run_shape), f"{recipe.name}: LoRA left the base trainable"
