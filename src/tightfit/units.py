"""Memory sizes: parse ``6GiB``-style strings and format byte counts for people."""

import re

from tightfit.errors import SpecError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_memory(text: str | int | float, where: str = "memory") -> int:
    """Parse a memory size such as ``"6GiB"``, ``"512 MB"``, ``"1.5g"`` or ``1024`` into bytes.

    Decimal units (KB, MB, GB, TB) are powers of 1000, binary units (KiB, MiB, GiB, TiB) and the
    one-letter forms (K, M, G, T, as ``nvidia-smi`` and PyTorch print them) are powers of 1024.
    A bare number is a count of bytes.

    Args:
        text: the size to parse.
        where: what the size is for, named in the error message (``"--memory"``).

    Returns:
        The size in bytes.

    Raises:
        SpecError: when the string is not a positive size with a known unit.
    """
    if isinstance(text, bool):
        raise SpecError(f"{where}: expected a memory size like 6GiB, got {text!r}")
    if isinstance(text, (int, float)):
        if text <= 0:
            raise SpecError(f"{where}: memory size must be positive, got {text!r}")
        return int(text)
    match = _SIZE.match(str(text))
    if not match:
        raise SpecError(f"{where}: cannot read {text!r} as a memory size (examples: 6GiB, 512MB, 16G)")
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit not in _UNITS:
        raise SpecError(f"{where}: unknown unit {match.group(2)!r} in {text!r} (use B, KB, MB, GB, KiB, MiB or GiB)")
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise SpecError(f"{where}: memory size must be positive, got {text!r}")
    return size


def format_bytes(size: int | float | None) -> str:
    """Format a byte count with a binary unit: ``format_bytes(6 * 2**30) == "6.00 GiB"``."""
    if size is None:
        return "-"
    size = float(size)
    sign = "-" if size < 0 else ""
    size = abs(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{sign}{size:.0f} {unit}" if unit == "B" else f"{sign}{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def format_seconds(value: float | None) -> str:
    """A duration the way a person reads it: ``format_seconds(0.25) == "250 ms"``, then s, min, h."""
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """A count with its noun in the right number: ``plural(1, "estimate") == "1 estimate"``,
    ``plural(8, "estimate") == "8 estimates"``; ``plural_form`` for irregular nouns."""
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {plural_form or noun + 's'}"
