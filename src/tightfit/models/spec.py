"""Model specs: one string names any model tightfit can build.

================================  ==========================================================
spec                              builds
================================  ==========================================================
``builtin:NAME``                  a model from :mod:`tightfit.models.builtin` (``digits-cnn`` ...)
``torchvision:NAME``              ``torchvision.models.get_model(NAME, weights=None)``: random init
``hf:DIR``                        a local Hugging Face directory: with weights, ``from_pretrained``
                                  offline; with only ``config.json``, the class named in its
                                  ``architectures`` (``AutoModel`` when none) with random init
``diffusion:DIR``                 ``tightfit.models.diffusion.build_diffusion_model(DIR)``
``module.path:callable``          ``callable(**kwargs)`` from an importable module
================================  ==========================================================

``meta=True`` builds the model on the ``meta`` device: shapes and dtypes without storage, so the
planner can look at a 7B model without allocating 28 GB.

Input specs (``3x224x224``, ``tokens:512``) and random batches live in
:mod:`tightfit.models.inputs` and are re-exported here.
"""

import contextlib
import difflib
import importlib
import inspect
import json
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tightfit._optional import require
from tightfit.errors import SpecError
from tightfit.models.builtin import BUILTINS, FROM_INPUT_SHAPE, WITHOUT_CLASSES
from tightfit.models.inputs import InputSpec, make_batch_factory, parse_input_spec
from tightfit.paths import model_folder
from tightfit.trust import function_module_allowed, refuse_non_model_module

__all__ = [
    "InputSpec",
    "PREFIXES",
    "build_model",
    "build_model_for_data",
    "make_batch_factory",
    "parse_input_spec",
]

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_MODULE_PATH = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*")


def _first_sentence(error: Exception) -> str:
    """The first line of a library's error message, for a one-line report."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0].strip()


def _closest(name: str, candidates: list[str]) -> str:
    matches = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    return f"; did you mean {' or '.join(matches)}?" if matches else ""


def _build_builtin(name: str, *, num_classes: int | None, **kwargs) -> nn.Module:
    if name not in BUILTINS:
        raise SpecError(
            f"model spec 'builtin:{name}': unknown builtin model{_closest(name, list(BUILTINS))} "
            f"(builtins: {', '.join(BUILTINS)})"
        )
    if num_classes is not None and name not in WITHOUT_CLASSES:
        kwargs["num_classes"] = num_classes
    try:
        return BUILTINS[name](**kwargs)
    except (TypeError, ValueError) as error:
        raise SpecError(f"model spec 'builtin:{name}': {error}") from None


def _build_torchvision(name: str, *, num_classes: int | None, **kwargs) -> nn.Module:
    require("torchvision", extra="vision", purpose=f"the model spec 'torchvision:{name}'")
    from torchvision import models

    available = models.list_models()
    if name not in available:
        raise SpecError(
            f"model spec 'torchvision:{name}': unknown torchvision model{_closest(name, available)} "
            "(see torchvision.models.list_models())"
        )
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    # weights=None: random init, nothing is downloaded.
    try:
        return models.get_model(name, weights=None, **kwargs)
    except (TypeError, ValueError) as error:
        raise SpecError(f"model spec 'torchvision:{name}': {error}") from None


def _build_hf(directory: str, *, num_classes: int | None, meta: bool = False, **kwargs) -> nn.Module:
    transformers = require("transformers", extra="hf", purpose=f"the model spec 'hf:{directory}'")
    path = _model_folder(directory, f"hf:{directory}")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise SpecError(f"model spec 'hf:{directory}': no config.json in {path} (need a local model directory)")
    try:
        config_json = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SpecError(f"model spec 'hf:{directory}': {config_path} is not valid JSON ({error})") from None
    if not isinstance(config_json, dict):
        raise SpecError(
            f"model spec 'hf:{directory}': {config_path} holds a JSON {type(config_json).__name__}, not an object of "
            "settings"
        )
    architectures = config_json.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(name, str) for name in architectures):
        raise SpecError(
            f"model spec 'hf:{directory}': 'architectures' in {config_path} should be a list of class names"
        )
    model_class = transformers.AutoModel
    if architectures:
        model_class = getattr(transformers, architectures[0], None)
        if model_class is None:
            raise SpecError(
                f"model spec 'hf:{directory}': architecture {architectures[0]!r} in {config_path} "
                f"is not a class of transformers {transformers.__version__}"
            )
        if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
            raise SpecError(
                f"model spec 'hf:{directory}': architecture {architectures[0]!r} in {config_path} "
                "is not a model class of transformers (it names a function or a non-model class)"
            )
    config_kwargs = dict(kwargs)
    if num_classes is not None:
        config_kwargs["num_labels"] = num_classes
    has_weights = any((path / name).is_file() for name in _WEIGHT_FILES)
    try:
        if has_weights and not meta:
            return model_class.from_pretrained(
                path,
                local_files_only=True,
                ignore_mismatched_sizes=num_classes is not None,
                trust_remote_code=False,
                **config_kwargs,
            )
        # trust_remote_code=False, not None: with None transformers asks on the terminal whether to
        # run the folder's own Python files (auto_map); a model folder never runs code here.
        config = transformers.AutoConfig.from_pretrained(
            path, local_files_only=True, trust_remote_code=False, **config_kwargs
        )
        # Under the meta device, parameters get shapes but no storage: a 7B config costs nothing.
        with torch.device("meta") if meta else contextlib.nullcontext():
            if model_class is transformers.AutoModel:
                return model_class.from_config(config)
            return model_class._from_config(config)  # what AutoModel.from_config calls for a known class
    except (OSError, ValueError, TypeError, KeyError, pickle.UnpicklingError) as error:
        # transformers' messages run over several lines (an unknown model_type lists every known one);
        # UnpicklingError: a pytorch_model.bin holding objects, which weights_only refuses to build
        raise SpecError(f"model spec 'hf:{directory}': {_first_sentence(error)}") from None


def _build_diffusion(directory: str, *, num_classes: int | None, meta: bool = False, **kwargs) -> nn.Module:
    try:
        diffusion = importlib.import_module("tightfit.models.diffusion")
    except ModuleNotFoundError as error:
        if error.name != "tightfit.models.diffusion":
            raise
        raise SpecError(
            f"model spec 'diffusion:{directory}': diffusion models are not available in this build"
        ) from None
    return diffusion.build_diffusion_model(str(_model_folder(directory, f"diffusion:{directory}")), meta=meta, **kwargs)


def _model_folder(directory: str, spec: str) -> Path:
    """The local folder of an ``hf:`` or ``diffusion:`` spec (:func:`tightfit.paths.model_folder`)."""
    try:
        return model_folder(directory, where=f"model spec {spec!r}")
    except ValueError as error:
        raise SpecError(str(error)) from None


def _build_callable(module_name: str, attribute: str, *, num_classes: int | None, **kwargs) -> nn.Module:
    """``module:callable``: only a subclass of ``nn.Module`` (checked before it is called) or a
    plain Python function outside the standard library and torch, whose result must be a module.
    Whether a spec read from a file may get here at all is decided by ``tightfit.trust``."""
    spec = f"{module_name}:{attribute}"
    refuse_non_model_module(module_name, spec)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise SpecError(
            f"model spec {spec!r}: cannot import module {module_name!r} "
            f"({error}){_closest(module_name, list(PREFIXES))} "
            f"(valid prefixes: {', '.join(PREFIXES)}, or module.path:callable)"
        ) from None
    factory: Any = module
    for part in attribute.split("."):
        factory = getattr(factory, part, None)
    if not callable(factory):
        raise SpecError(f"model spec {spec!r}: module {module_name!r} has no callable {attribute!r}")
    if inspect.isclass(factory):
        if not issubclass(factory, nn.Module):
            raise SpecError(
                f"model spec {spec!r}: {attribute} is the class {factory.__name__}, not a subclass of torch.nn.Module"
            )
    elif not inspect.isfunction(factory) or not function_module_allowed(factory.__module__):
        raise SpecError(
            f"model spec {spec!r}: {attribute} (from {getattr(factory, '__module__', None) or 'C code'}) is not a "
            "model "
            "class or factory; name a subclass of torch.nn.Module or a Python function that returns one"
        )
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        model = factory(**kwargs)
    except TypeError as error:  # wrong or missing keyword arguments
        raise SpecError(f"model spec {spec!r}: {error}") from None
    if not isinstance(model, nn.Module):
        raise SpecError(f"model spec {spec!r}: {attribute}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


# prefix -> builder(rest_of_spec, num_classes=..., **kwargs). hf and diffusion handle ``meta``
# themselves (they must not read weight files first); the others are built under the meta device.
PREFIXES: dict[str, Callable[..., nn.Module]] = {
    "builtin": _build_builtin,
    "torchvision": _build_torchvision,
    "hf": _build_hf,
    "diffusion": _build_diffusion,
}


def build_model(spec: str, *, num_classes: int | None = None, meta: bool = False, **kwargs) -> nn.Module:
    """Build the model a spec names.

    Args:
        spec: ``builtin:NAME``, ``torchvision:NAME``, ``hf:DIR``, ``diffusion:DIR`` or
            ``module.path:callable`` (see the module doc).
        num_classes: number of output classes, passed to models that have a classifier
            (``num_labels`` for HF models); ``None`` keeps the model's default.
        meta: build on the ``meta`` device (no storage) for planning.
        **kwargs: passed to the model's constructor (builtin, torchvision, callable) or used as
            config overrides (hf).

    Returns:
        The model, in training mode.

    Raises:
        SpecError: the spec has no known prefix, names an unknown model, or the model cannot be
            built from it; the message names the spec and what is valid.

    Example:
        >>> model = build_model("builtin:digits-cnn")
        >>> llama = build_model("hf:packaged:llama-7b", meta=True)
    """
    if not isinstance(spec, str) or ":" not in spec:
        hint = ""
        if isinstance(spec, str) and spec in BUILTINS:
            hint = f"; did you mean builtin:{spec}?"
        raise SpecError(
            f"model spec {spec!r} has no prefix{hint} (use builtin:NAME, torchvision:NAME, hf:DIR, "
            "diffusion:DIR or module.path:callable)"
        )
    prefix, rest = spec.split(":", 1)
    if not rest:
        raise SpecError(f"model spec {spec!r}: nothing after {prefix + ':'!r}")
    if prefix in ("hf", "diffusion"):
        model = PREFIXES[prefix](rest, num_classes=num_classes, meta=meta, **kwargs)
    elif prefix in PREFIXES:
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = PREFIXES[prefix](rest, num_classes=num_classes, **kwargs)
    elif _MODULE_PATH.fullmatch(prefix) and _MODULE_PATH.fullmatch(rest):
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = _build_callable(prefix, rest, num_classes=num_classes, **kwargs)
    else:
        raise SpecError(
            f"model spec {spec!r}: unknown prefix {prefix!r}{_closest(prefix, list(PREFIXES))} "
            f"(use builtin:NAME, torchvision:NAME, hf:DIR, diffusion:DIR or module.path:callable)"
        )
    return model.train()


def build_model_for_data(
    spec: str, options: dict[str, Any], *, num_classes: int | None, input_shape: tuple[int, ...] | None
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model a run's recipe names for the data it trains on.

    The class count comes from the data (``model_options.num_classes`` may repeat it, not
    contradict it); a builtin also takes its input width or channels from the data unless the
    recipe sets them (``builtin:mlp`` on a 13-column CSV gets ``in_features=13``).

    Args:
        spec: the model spec.
        options: the recipe's ``model_options``.
        num_classes: the data's class count, or None.
        input_shape: the shape of one input sample, or None (text).

    Returns:
        ``(model, inferred)``: the model, and the options taken from the data that differ from
        the model's defaults (to tell the user).

    Raises:
        SpecError: ``model_options.num_classes`` disagrees with the data, or the model cannot be built.
    """
    options = dict(options)
    if "num_classes" in options:
        asked = options.pop("num_classes")
        if num_classes is not None and asked != num_classes:
            raise SpecError(
                f"model_options.num_classes: {asked!r}, but the data has {num_classes} classes; "
                "remove model_options.num_classes (it is taken from the data)"
            )
        num_classes = asked
    inferred: dict[str, Any] = {}
    name = spec.removeprefix("builtin:") if isinstance(spec, str) and spec.startswith("builtin:") else None
    if name in FROM_INPUT_SHAPE and input_shape:
        defaults = inspect.signature(BUILTINS[name]).parameters
        for option, from_shape in FROM_INPUT_SHAPE[name].items():
            if option not in options:
                options[option] = int(from_shape(tuple(input_shape)))
                if options[option] != defaults[option].default:
                    inferred[option] = options[option]
    return build_model(spec, num_classes=num_classes, **options), inferred
