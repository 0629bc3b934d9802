"""Shared output helpers for the commands: JSON for scripts, rich tables for people."""

import json
import math
import sys
from typing import Any


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()  # numpy / torch scalars
    return value


def print_json(payload: Any) -> None:
    """Print ``payload`` as one JSON document on stdout (NaN and infinity become null)."""
    json.dump(_jsonable(payload), sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def console():
    """A rich console on stdout; imported lazily so ``--help`` stays fast."""
    from rich.console import Console

    return Console(highlight=False)
