"""What may run code: Python-callable model specs and ``torch.export`` archives.

Two things tightfit reads can execute code, and each is behind a rule (see docs/security.md):

* A ``module.path:callable`` model spec imports a module and calls it. Typed by the user (``plan
  --model``, ``batch-size --model``, ``compress SPEC``) or passed from Python, it is the user's own
  choice. Read from a **file** someone may have handed over — a recipe, a run folder's
  ``config.yaml``, a compression recipe, a pipeline file — it runs only with ``--trust-code`` on
  the command (``trust_code=True`` in Python) or when its module lies under a prefix listed in
  the ``TIGHTFIT_TRUSTED_MODULES`` environment variable (comma-separated, e.g. ``mylab.models``).
  Wherever it comes from, :func:`refuse_non_model_module` turns away modules no model lives in
  (``os``, ``subprocess``, the whole standard library) before anything is imported, and
  ``models/spec.py`` calls only ``nn.Module`` subclasses (checked before the call) or plain
  Python functions whose result is an ``nn.Module``.
* A ``.pt2`` archive: ``torch.export.load`` may unpickle parts of it without ``weights_only``.
  ``tightfit compress`` records the SHA-256 of every ``.pt2`` it writes in a trust record under
  the user's data folder (``$TIGHTFIT_HOME``, else ``$XDG_DATA_HOME/tightfit``, else
  ``~/.local/share/tightfit``); ``tightfit predict`` loads only archives recorded there, or any
  archive with ``--trust-pt2``.

This module imports neither torch nor anything heavy: ``tightfit.config`` uses it.
"""

import hashlib
import os
import sys
import warnings
from pathlib import Path

from tightfit.errors import ConfigError, SpecError
from tightfit.names import MODEL_PREFIXES

TRUSTED_MODULES_ENV = "TIGHTFIT_TRUSTED_MODULES"

# tightfit's own modules whose every callable builds a model (or returns something that is
# refused as not a module), so shipped recipes such as recipes/lora-text-classification.yaml run
# without an opt-in. Not all of tightfit: tightfit.cli:main or tightfit.models.spec:build_model
# called from a file would hand the file a way around these rules.
SHIPPED_MODEL_MODULES = ("tightfit.models.text",)

# Roots of packages that hold loaders, shells or serialisers but no model a spec could name.
# The standard library is refused as a whole (sys.stdlib_module_names).
_NOT_MODEL_PACKAGES = frozenset({"pip", "setuptools", "pkg_resources", "dill", "cloudpickle", "joblib", "IPython"})

# Packages whose classes may be models (torch.nn:Linear) but whose functions are not model
# factories (torch.serialization:load would unpickle anything it is pointed at).
_CLASSES_ONLY_PACKAGES = frozenset({"torch", "numpy", "yaml", "safetensors", "onnx", "onnxruntime"})


def is_code_spec(spec: object) -> bool:
    """Whether a model spec names Python code (``module.path:callable``), not a known prefix."""
    return isinstance(spec, str) and ":" in spec and spec.split(":", 1)[0] not in MODEL_PREFIXES


def trusted_module_prefixes() -> tuple[str, ...]:
    """The module prefixes the user trusts in files (``TIGHTFIT_TRUSTED_MODULES``)."""
    raw = os.environ.get(TRUSTED_MODULES_ENV, "")
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _under(module_name: str, prefixes: tuple[str, ...]) -> bool:
    return any(module_name == prefix or module_name.startswith(prefix + ".") for prefix in prefixes)


def check_spec_from_file(spec: object, *, where: str, trust_code: bool) -> None:
    """Refuse a ``module.path:callable`` spec read from a file unless the user opted in.

    Args:
        spec: the model spec as the file wrote it.
        where: the file and key, for the message (``recipe.yaml: model``).
        trust_code: ``--trust-code`` was given.

    Raises:
        ConfigError: the spec is Python code and neither ``trust_code`` nor the allow-list covers it.
    """
    if not is_code_spec(spec) or trust_code:
        return
    module_name = str(spec).split(":", 1)[0]
    if _under(module_name, SHIPPED_MODEL_MODULES + trusted_module_prefixes()):
        return
    raise ConfigError(
        f"{where}: model spec {spec!r} imports and runs Python code from module {module_name!r}; a file "
        f"does not get to run code unless you say so: pass --trust-code if you trust this file, or add "
        f"{module_name!r} to {TRUSTED_MODULES_ENV}"
    )


def refuse_non_model_module(module_name: str, spec: str) -> None:
    """Refuse, before importing it, a module that holds no model (``os``, ``subprocess``...).

    Raises:
        SpecError: the module is part of the standard library or a known non-model package.
    """
    root = module_name.split(".")[0]
    if root in sys.stdlib_module_names or root in _NOT_MODEL_PACKAGES:
        raise SpecError(
            f"model spec {spec!r}: module {module_name!r} holds no model (refused before import); "
            "name a class of nn.Module or a function that returns one"
        )


def function_module_allowed(function_module: str | None) -> bool:
    """Whether a plain function defined in ``function_module`` may be called as a model factory."""
    root = (function_module or "").split(".")[0]
    return (
        bool(root)
        and root not in sys.stdlib_module_names
        and root not in _NOT_MODEL_PACKAGES
        and root not in _CLASSES_ONLY_PACKAGES
    )


# --- torch.export archives -------------------------------------------------------------------


def trust_home() -> Path:
    """The folder of tightfit's local trust record (``$TIGHTFIT_HOME`` or the XDG data folder)."""
    if os.environ.get("TIGHTFIT_HOME"):
        return Path(os.environ["TIGHTFIT_HOME"]).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home).expanduser() / "tightfit"


def _program_record() -> Path:
    return trust_home() / "trusted-programs.sha256"


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_program(path: str | os.PathLike) -> str:
    """Record a ``.pt2`` this machine just wrote as trusted; returns its SHA-256.

    The record holds one ``SHA256  PATH`` line per archive (the path only for a reader's benefit:
    trust follows the content, so a copied or moved archive stays trusted and an edited one is not).
    """
    digest = file_sha256(path)
    record = _program_record()
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        with open(record, "a", encoding="utf-8") as handle:
            handle.write(f"{digest}  {Path(path).resolve()}\n")
    except OSError as error:  # a read-only home must not fail the export itself
        warnings.warn(
            f"{path}: not recorded as trusted in {record} ({error.strerror}); predict will need --trust-pt2 for it",
            stacklevel=2,
        )
    return digest


def is_recorded_program(path: str | os.PathLike) -> bool:
    """Whether this machine's ``compress`` wrote exactly this ``.pt2`` file."""
    record = _program_record()
    if not record.is_file():
        return False
    digest = file_sha256(path)
    with open(record, encoding="utf-8", errors="replace") as handle:
        return any(line.split("  ", 1)[0] == digest for line in handle)


def check_program(path: str | os.PathLike, *, trust_pt2: bool) -> None:
    """Refuse a ``.pt2`` archive this machine did not write, unless the user opted in.

    Raises:
        ConfigError: naming the file and the ``--trust-pt2`` opt-in.
    """
    if trust_pt2 or is_recorded_program(path):
        return
    raise ConfigError(
        f"{path}: this .pt2 was not written by tightfit compress on this machine, and loading a .pt2 "
        "can run code inside it; use the .onnx file, or pass --trust-pt2 if you trust its source"
    )
