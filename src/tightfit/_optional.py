"""Import optional dependencies with an install hint instead of an ImportError traceback."""

import importlib
import importlib.util
import logging
import sys
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
            f'{purpose} needs {module_name}, which is not installed ({error}): pip install "tightfit[{extra}]"'
        ) from None


_HUB_LOGGERS = ("bitsandbytes.backends.cpu.ops", "bitsandbytes.backends.mps.ops")


def import_bitsandbytes():
    """Import bitsandbytes without letting it fetch hub kernels or print about not doing so.

    Its CPU backend asks the ``kernels`` package for a hub kernel at import (on CPUs with
    AVX512-BF16) and its MPS backend at the first 4-bit op (macOS 26): ``kernels`` is hidden
    while bitsandbytes imports, the warning it logs about that is silenced, and the MPS look-up
    is marked failed, so bitsandbytes uses its own compiled kernels and nothing is fetched.

    Returns:
        The ``bitsandbytes`` module.

    Raises:
        MissingExtraError: when bitsandbytes is not installed.
    """
    if "bitsandbytes" not in sys.modules:
        hidden = sys.modules.get("kernels", _MISSING)
        loggers = [logging.getLogger(name) for name in _HUB_LOGGERS]
        disabled = [logger.disabled for logger in loggers]
        sys.modules["kernels"] = None  # ``from kernels import get_kernel`` raises ImportError
        for logger in loggers:
            logger.disabled = True
        try:
            require("bitsandbytes", extra="gpu", purpose="bitsandbytes (NF4 bases, 8-bit Adam)")
        finally:
            if hidden is _MISSING:
                del sys.modules["kernels"]
            else:
                sys.modules["kernels"] = hidden
            for logger, was in zip(loggers, disabled, strict=True):
                logger.disabled = was
    bnb = sys.modules["bitsandbytes"]
    mps_ops = sys.modules.get("bitsandbytes.backends.mps.ops")
    if mps_ops is not None:  # its hub kernel is looked up at the first 4-bit op, not at import
        mps_ops._kernel_load_failed = True
    return bnb


_MISSING = object()
