"""The configuration plumbing (issue 10, item 6): name lists live once in the torch-free
tightfit.names, and the config, the pydantic Literal types and the argparse choices are built from
them; tightfit.config imports no torch."""

import argparse
import subprocess
import sys
import typing

import pytest

from tightfit import names


def test_importing_the_config_does_not_import_torch():
    code = (
        "import sys, tightfit.config, tightfit.trust, tightfit.names, tightfit.models.lora_config\n"
        "heavy = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def _literal_values(annotation) -> set:
    values = set()
    for argument in typing.get_args(annotation) or (annotation,):
        if typing.get_origin(argument) is typing.Literal:
            values |= set(typing.get_args(argument))
    if typing.get_origin(annotation) is typing.Literal:
        values |= set(typing.get_args(annotation))
    return values


def _choices(command: str, option: str) -> tuple:
    from tightfit.cli import build_parser

    parser = build_parser()
    subparsers = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    sub = subparsers.choices[command]
    return tuple(next(action for action in sub._actions if option in action.option_strings).choices)


@pytest.mark.parametrize(
    "annotation, expected",
    [
        ("tightfit.config:OptimizerConfig.name", names.OPTIMIZERS),
        ("tightfit.config:ScheduleConfig.name", names.SCHEDULES),
        ("tightfit.config:TrainConfig.precision", ("auto", *names.PRECISIONS)),
        ("tightfit.compression.recipe:FinetuneConfig.optimizer", names.OPTIMIZERS),
        ("tightfit.compression.recipe:QuantizeStep.method", names.QUANTIZE_METHODS),
        ("tightfit.plan.pipeline:StageConfig.precision", names.PRECISIONS),
        ("tightfit.plan.pipeline:StageConfig.optimizer", names.OPTIMIZERS),
        ("tightfit.plan.pipeline:StageConfig.quantize_base", names.QUANTIZE_BASES),
        ("tightfit.models.lora_config:LoRAConfig.quantize_base", names.QUANTIZE_BASES),
        ("tightfit.data.config:DataConfig.source", __import__("tightfit.data.config", fromlist=["SOURCES"]).SOURCES),
    ],
)
def test_literal_types_are_built_from_the_name_lists(annotation, expected):
    import importlib

    module_name, rest = annotation.split(":")
    class_name, field = rest.split(".")
    model = getattr(importlib.import_module(module_name), class_name)
    assert _literal_values(model.model_fields[field].annotation) == set(expected)


@pytest.mark.parametrize(
    "command, option, expected",
    [
        ("plan", "--precision", names.PRECISIONS),
        ("plan", "--optimizer", names.OPTIMIZERS),
        ("plan", "--quantize-base", names.QUANTIZE_BASES),
        ("batch-size", "--precision", names.PRECISIONS),
        ("batch-size", "--optimizer", names.OPTIMIZERS),
        ("compress", "--quantize-method", names.QUANTIZE_METHODS),
    ],
)
def test_command_line_choices_are_the_name_lists(command, option, expected):
    assert _choices(command, option) == tuple(expected)


def test_adam8bit_is_valid_everywhere_an_optimizer_is_named():
    from tightfit.compression.recipe import FinetuneConfig
    from tightfit.config import OptimizerConfig

    assert OptimizerConfig(name="adam8bit").name == FinetuneConfig(optimizer="adam8bit").optimizer == "adam8bit"
