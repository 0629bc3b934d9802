"""Import optional dependencies with an install hint instead of an ImportError traceback."""

import importlib
import importlib.util
from types import ModuleType

from tightfit.errors import MissingExtraError


def is_available(module_name: str) -> bool:
    """Whether ``module_name`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module_name) is not None
    except (ImportError, ValueError):
        return False


def require(module_name: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module_name`` or raise :class:`MissingExtraError` naming the extra.

    Args:
        module_name: the module to import, e.g. ``"transformers"``.
        extra: the tightfit extra that installs it, e.g. ``"hf"``.
        purpose: what it is needed for, in a few words ("LoRA fine-tuning").

    Returns:
        The imported module.

    Raises:
        MissingExtraError: when the module cannot be imported.

    Example:
        >>> ort = require("onnxruntime", extra="onnx", purpose="running ONNX models")
    """
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        raise MissingExtraError(
            f"{purpose} needs {module_name}, which is not installed ({error}): "
            f'pip install "tightfit[{extra}]"'
        ) from None
