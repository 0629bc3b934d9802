"""Reading settings files and saying what is wrong in them: the one YAML reader and the one
pydantic error formatter of every configuration type (run configs, data sections, compression
recipes, pipeline files, LoRA sections). Torch-free.

Example::

    tree = read_yaml("recipes/digits.yaml")
    try:
        OptimizerConfig.model_validate({"lrr": 0.1})
    except ValidationError as error:
        describe_validation_error(error, OptimizerConfig, prefix="optimizer")
        # "optimizer.lrr: unknown key; did you mean 'lr'? (valid: name, lr, ...)"
"""

import difflib
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tightfit.errors import ConfigError


def read_yaml(path: str | Path, *, what: str = "config file") -> dict:
    """Read a YAML settings file into a dict (``yaml.safe_load``: plain data only, no Python tags).

    Args:
        path: the file.
        what: how messages name it ("config file", "recipe", "pipeline file").

    Raises:
        ConfigError: the file is missing, a folder, not UTF-8 text, not YAML, empty, or not a
            mapping at the top; one line naming the file.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path}: not a text file (not UTF-8); expected YAML settings") from None
    except OSError as error:
        raise ConfigError(f"{what} {path}: cannot be read ({error.strerror})") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{what} {path}: not valid YAML{where}: {problem}") from None
    if tree is None:
        # an empty file is a mistake (a wrong path, an unsaved editor), not a request for defaults
        raise ConfigError(f"{what} {path} is empty; expected YAML settings")
    if not isinstance(tree, dict):
        raise ConfigError(f"{what} {path}: expected a mapping of settings at the top, got {type(tree).__name__}")
    return tree


def closest(name: object, valid: typing.Iterable[object]) -> str:
    """``"; did you mean 'x'?"`` for the closest valid name, or ``""``."""
    matches = difflib.get_close_matches(str(name), [str(item) for item in valid], n=1, cutoff=0.5)
    return f"; did you mean '{matches[0]}'?" if matches else ""


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models inside an annotation (``X | None``, ``list[X]``, a tagged union...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for argument in typing.get_args(annotation):
        found += _models_in(argument)
    return found


def _tag_of(model: type[BaseModel]) -> set[str]:
    """The discriminator values (``Literal`` fields) a member of a tagged union answers to."""
    tags = set()
    for model_field in model.model_fields.values():
        if typing.get_origin(model_field.annotation) is typing.Literal:
            tags |= {str(value) for value in typing.get_args(model_field.annotation)}
    return tags


def _walk(root: type[BaseModel], location: tuple) -> tuple[list[str], type[BaseModel] | None, list[type[BaseModel]]]:
    """The key names along an error location, the model holding its last key, and the members
    of the tagged union it ends in (if it does).

    pydantic adds list indexes (kept as ``[i]``), the tag of a tagged union (``prune``) and one
    location per branch of a plain union (``int``, ``literal['auto']``, ``function-after[...]``),
    which are dropped, so every branch of one key names the same key.
    """
    names: list[str] = []
    model: type[BaseModel] | None = root
    candidates: list[type[BaseModel]] = []
    for part in location:
        if isinstance(part, int):
            if names:
                names[-1] += f"[{part}]"
            continue
        if candidates:  # inside a tagged union: the tag picks the member
            chosen = [candidate for candidate in candidates if part in _tag_of(candidate)]
            if chosen:
                model, candidates = chosen[0], []
                continue
        if model is not None and part in model.model_fields:
            names.append(part)
            nested = _models_in(model.model_fields[part].annotation)
            model, candidates = (nested[0] if nested else None), (nested if len(nested) > 1 else [])
        # anything else is a union branch's name or the unknown key itself: not part of the key
    return names, model, candidates


@dataclass
class _KeyProblems:
    """What is wrong with one key."""

    messages: list[str] = field(default_factory=list)  # complete sentences
    expected: list[str] = field(default_factory=list)  # "a valid integer", "'auto'": one per union branch
    hint: str = ""  # "; did you mean 'cosine'?"
    given: Any = None


def describe_validation_error(
    error: ValidationError,
    root: type[BaseModel],
    *,
    prefix: str = "",
    where: Callable[[str], str] | None = None,
) -> str:
    """One line naming every bad key, what is wrong, the value given and the closest valid key.

    Args:
        error: what pydantic raised validating ``root``.
        root: the model that was validated.
        prefix: put before every key (``data`` when a data section is validated alone).
        where: gives, for a dotted key, where it was set (`` (in run.yaml)``), put after it.

    Returns:
        ``key: problem; key: problem``, e.g. ``optimizer.lrr: unknown key; did you mean 'lr'?
        (valid: name, lr, ...)`` or ``data.num_workers: should be a valid integer or 'auto'
        (got 'many')``.
    """
    problems: dict[str, _KeyProblems] = {}
    for item in error.errors():
        names, model, members = _walk(root, tuple(item["loc"]))
        kind, message = item["type"], item["msg"]
        if kind == "extra_forbidden":
            unknown = str(item["loc"][-1])
            valid = list(model.model_fields) if model is not None else []
            key = ".".join([prefix, *names, unknown] if prefix else [*names, unknown])
            problems.setdefault(key, _KeyProblems()).messages.append(
                f"unknown key{closest(unknown, valid)} (valid: {', '.join(valid)})"
            )
            continue
        key = ".".join([prefix, *names] if prefix else names) or (prefix or "settings")
        problem = problems.setdefault(key, _KeyProblems())
        if kind in ("union_tag_invalid", "union_tag_not_found"):  # a tagged union: name the tags
            tag_name = item.get("ctx", {}).get("discriminator", "'kind'")
            field_name = tag_name.strip("'")
            tags = [
                str(value)
                for member in members
                if field_name in member.model_fields
                for value in typing.get_args(member.model_fields[field_name].annotation)
            ]
            given = item["input"].get(field_name) if isinstance(item.get("input"), dict) else None
            got = f"got {given!r}" if given is not None else f"no {tag_name} key"
            problem.messages.append(
                f"{tag_name} must be one of {', '.join(tags)}{closest(given, tags) if given else ''} ({got})"
            )
        elif kind == "value_error":  # our own validators say what is wrong and quote the value
            problem.messages.append(message.removeprefix("Value error, "))
        else:
            problem.given = item.get("input")
            problem.expected.append(message.removeprefix("Input should be ").split(", unable")[0])  # drop parse detail
            if kind == "literal_error" and not problem.hint:
                problem.hint = closest(problem.given, re.findall(r"'([^']*)'", message))
    lines = []
    for key, problem in problems.items():
        messages = list(dict.fromkeys(problem.messages))
        if problem.expected:
            # every branch of a union at once: "should be a valid integer or 'auto' (got 'many')"
            expected = " or ".join(dict.fromkeys(problem.expected))
            messages.append(f"should be {expected} (got {problem.given!r}){problem.hint}")
        suffix = where(key) if where is not None else ""
        lines.append(f"{key}{suffix}: {'; '.join(messages)}")
    return "; ".join(lines)
