"""Find out what a path is, render its page, write it.

What ``write_report`` accepts:

- a training run folder (``summary.json`` or ``metrics.jsonl`` with ``config.yaml``);
- a compression output folder, or its ``report.json``;
- a study folder (``results.json``), or the file;
- a JSON file of ``tightfit plan --json`` (one model or a pipeline) or ``tightfit doctor --json``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from tightfit.errors import ConfigError

REPORT_FILE = "report.html"
KINDS = ("run", "plan", "compression", "doctor", "study")


def _renderer(kind: str) -> Callable[..., str]:
    # imported on use: each page module is small, and a caller renders one kind
    from tightfit.report import compression, doctor, plan, study

    return {"plan": plan.render, "compression": compression.render, "doctor": doctor.render, "study": study.render}[
        kind
    ]


def kind_of_data(data: object, where: str) -> str:
    """Which page a JSON document makes; ConfigError naming ``where`` when it is none of them."""
    if isinstance(data, dict):
        if "artifacts" in data and "best" in data:
            return "compression"
        if "evaluations" in data and "stages" in data:
            return "study"
        if "checks" in data and "verdict" in data:
            return "doctor"
        if ("breakdown" in data and "peak_bytes" in data) or ("stages" in data and "budget_bytes" in data):
            return "plan"
    raise ConfigError(
        f"{where}: not a tightfit report source (expected the JSON of `tightfit plan --json`, `tightfit doctor "
        "--json`, "
        "a compression report.json or a study results.json)"
    )


def detect_kind(path: str | os.PathLike) -> tuple[str, Path]:
    """``(kind, the file or folder to read)`` for ``path``.

    Raises:
        ConfigError: ``path`` is missing or is nothing a page can be made from.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "results.json").is_file():
            return "study", path / "results.json"
        if (path / "summary.json").is_file() or (
            (path / "metrics.jsonl").is_file() and (path / "config.yaml").is_file()
        ):
            return "run", path
        if (path / "report.json").is_file():
            return "compression", path / "report.json"
        raise ConfigError(
            f"{path}: a folder without summary.json, metrics.jsonl, report.json or results.json: "
            "not a training run, a compression run or a study"
        )
    if not path.is_file():
        raise ConfigError(f"{path}: no such file or folder")
    if path.name in ("summary.json", "metrics.jsonl"):
        return "run", path.parent
    return kind_of_data(_read_json(path), str(path)), path


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None


def render_data(kind: str, data: dict, source: str = "") -> str:
    """The page of an in-memory result (``plan --html`` and ``doctor --html`` use this)."""
    if kind not in KINDS or kind == "run":
        raise ValueError(f"render_data: kind must be one of {KINDS[1:]}, not {kind!r}")
    return _renderer(kind)(data, source)


def render(path: str | os.PathLike) -> tuple[str, str]:
    """``(kind, html)`` of the page for ``path``."""
    kind, source = detect_kind(path)
    if kind == "run":
        from tightfit.report import run

        return kind, run.render(source)
    return kind, _renderer(kind)(_read_json(source), str(source))


def default_output(path: str | os.PathLike) -> Path:
    """Where a page goes when no ``-o`` is given: ``report.html`` in a folder; beside a JSON file,
    with its name and ``.html`` (``plan.json`` -> ``plan.html``; a compression or study file's
    folder gets ``report.html``)."""
    path = Path(path)
    if path.is_dir():
        return path / REPORT_FILE
    if path.name in ("summary.json", "metrics.jsonl", "report.json", "results.json"):
        return path.parent / REPORT_FILE
    return path.with_suffix(".html")


def check_output(output: str | os.PathLike, where: str = "output") -> Path:
    """``output`` as a Path, after checking a page can be written there (before any slow work).

    Raises:
        ConfigError: ``output`` is a folder, or its folder does not exist.
    """
    output = Path(output)
    if output.is_dir():
        raise ConfigError(f"{where}: {output} is a folder; give a file name such as {output / REPORT_FILE}")
    if not output.parent.is_dir():
        raise ConfigError(f"{where}: {output}: the folder {output.parent} does not exist")
    if not os.access(output.parent, os.W_OK | os.X_OK) or (output.exists() and not os.access(output, os.W_OK)):
        raise ConfigError(f"{where}: {output}: cannot write there (permission denied)")
    return output


def write_html(text: str, output: str | os.PathLike) -> Path:
    """Write a page atomically (a half-written page never replaces a good one); returns its path."""
    output = check_output(output)
    temporary = output.with_name(output.name + ".tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(output)
    except OSError as error:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise ConfigError(f"{output}: cannot write the page: {error.strerror or error}") from None
    return output


def write_report(path: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Write the HTML page of ``path`` (a run, compression or study folder, or a plan, doctor,
    compression or study JSON file); returns the page's path.

    Args:
        path: what to report on (see the module docstring).
        output: the page's path; default ``report.html`` in the folder, or ``NAME.html`` beside a file.

    Raises:
        ConfigError: ``path`` is nothing a page can be made from, or ``output`` cannot be written.

    Example:
        >>> write_report("runs/20260101-120000")          # doctest: +SKIP
        PosixPath('runs/20260101-120000/report.html')
    """
    _, text = render(path)
    return write_html(text, output if output is not None else default_output(path))
