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
    for field in model.model_fields.values():
        if typing.get_origin(field.annotation) is typing.Literal:
            tags |= {str(value) for value in typing.get_args(field.annotation)}
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
    problems: dict[str, list[str]] = {}
    inputs: dict[str, Any] = {}
    for item in error.errors():
        names, model, members = _walk(root, tuple(item["loc"]))
        kind, message = item["type"], item["msg"]
        if kind == "extra_forbidden":
            unknown = str(item["loc"][-1])
            valid = list(model.model_fields) if model is not None else []
            key = ".".join([prefix, *names, unknown] if prefix else [*names, unknown])
            problems.setdefault(key, []).append(f"unknown key{closest(unknown, valid)} (valid: {', '.join(valid)})")
            continue
        key = ".".join([prefix, *names] if prefix else names) or (prefix or "settings")
        if kind in ("union_tag_invalid", "union_tag_not_found"):
            context = item.get("ctx", {})
            tag_name = context.get("discriminator", "'kind'")
            field = tag_name.strip("'")
            tags = [
                str(value) for member in members if field in member.model_fields
                for value in typing.get_args(member.model_fields[field].annotation)
            ]
            given = item["input"].get(tag_name.strip("'")) if isinstance(item.get("input"), dict) else None
            got = f"got {given!r}" if given is not None else f"no {tag_name} key"
            problems.setdefault(key, []).append(
                f"{tag_name} must be one of {', '.join(tags)}{closest(given, tags) if given else ''} ({got})"
            )
            continue
        if kind == "value_error":  # our own validators say what is wrong and quote the value
            problems.setdefault(key, []).append(message.removeprefix("Value error, "))
            continue
        inputs[key] = item.get("input")
        hint = ""
        if kind == "literal_error":
            hint = closest(item.get("input"), re.findall(r"'([^']*)'", message))
        expected = message.removeprefix("Input should be ").split(", unable")[0]  # drop pydantic's parse detail
        problems.setdefault(key, []).append(f"should be {expected}{hint}")
    lines = []
    for key, messages in problems.items():
        messages = list(dict.fromkeys(messages))
        if key in inputs:
            shoulds = [message for message in messages if message.startswith("should be ")]
            others = [message for message in messages if not message.startswith("should be ")]
            if shoulds:
                # the branches of a union: "should be a valid integer or 'auto' (got 'many')"
                branches = [message.removeprefix("should be ").split("; did you mean")[0] for message in shoulds]
                hints = [message[message.index("; did you mean"):] for message in shoulds if "; did you mean" in message]
                others.append("should be " + " or ".join(branches) + f" (got {inputs[key]!r})" + (hints[0] if hints else ""))
            messages = others
        suffix = where(key) if where is not None else ""
        lines.append(f"{key}{suffix}: {'; '.join(messages)}")
    return "; ".join(lines)

