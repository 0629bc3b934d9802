"""The compression report: every artifact measured the same way, flagged, and the best named.

For the original model and after every step: size on disk (and gzip-compressed, where
unstructured sparsity shows), parameters and non-zeros, latency (median and p90 after warm-up)
at batch 1 and a larger batch with the thread count stated, throughput, and the task metric on
the held-out split. A step that is slower than the original at batch 1, or loses more than the
tolerance on the metric, is flagged; the best artifact is the fastest one that is neither.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tightfit.units import plural

# An artifact counts as slower/faster only beyond this relative margin: timings of identical
# models differ by a few percent from run to run.
LATENCY_NOISE = 0.05
REPORT_FIELDS = (
    "name",
    "step",
    "format",
    "artifact",
    "size_bytes",
    "gzip_bytes",
    "parameters",
    "nonzero_parameters",
    "latency",
    "throughput",
    "metric",
    "metric_change",
    "speedup",
    "size_ratio",
    "flags",
    "details",
    "seconds",
)


@dataclass
class Metric:
    """The task metric on the held-out split: ``accuracy`` (percent, higher is better) or ``loss``."""

    name: str
    value: float
    higher_is_better: bool
    split: str
    samples: int


@dataclass
class ArtifactRecord:
    """One row of the report: one artifact (the original, or the model after one step)."""

    name: str
    step: str
    format: str  # "pytorch" or "onnx"
    artifact: str
    size_bytes: int
    gzip_bytes: int
    parameters: int | None
    nonzero_parameters: int | None
    latency: dict[str, dict[str, Any]]  # "batch_1", "batch_64" -> Latency.to_dict()
    throughput: float  # samples/s at the largest batch measured
    metric: dict[str, Any] | None
    metric_change: float | None = None
    speedup: float | None = None  # original median / this median, batch 1
    size_ratio: float | None = None  # original size / this size
    flags: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def file_sizes(path: str | os.PathLike) -> tuple[int, int]:
    """``(bytes on disk, bytes after gzip -6)`` of a file."""
    path = Path(path)
    raw = path.read_bytes()
    return len(raw), len(gzip.compress(raw, compresslevel=6))


def compare(records: list[ArtifactRecord], *, tolerance: float = 1.0) -> None:
    """Fill in speed-up, size ratio, metric change and flags of every record against the first.

    Args:
        records: the original first, then one record per artifact.
        tolerance: metric drop (in the metric's units; accuracy points) beyond which a record is
            flagged.
    """
    original = records[0]
    base_latency = original.latency["batch_1"]["median_ms"]
    for record in records:
        record.speedup = base_latency / record.latency["batch_1"]["median_ms"]
        record.size_ratio = original.size_bytes / max(record.size_bytes, 1)
        if record is original:
            continue
        if record.speedup < 1.0 / (1.0 + LATENCY_NOISE):
            record.flags.append(f"slower than the original at batch 1 ({record.speedup:.2f}x)")
        if record.metric and original.metric:
            change = record.metric["value"] - original.metric["value"]
            record.metric_change = change
            loss = -change if original.metric["higher_is_better"] else change
            if loss > tolerance:
                record.flags.append(
                    f"{record.metric['name']} {'dropped' if original.metric['higher_is_better'] else 'rose'} "
                    f"by {abs(change):.2f} (tolerance {tolerance})"
                )


def choose_best(records: list[ArtifactRecord]) -> dict[str, Any]:
    """The fastest unflagged artifact that really beats the original, and the smallest one.

    Returns:
        ``{"fastest": name | None, "smallest": name | None, "why": sentence}``; ``fastest`` is
        the original's name when nothing was faster beyond timing noise.
    """
    original = records[0]
    clean = [record for record in records[1:] if not record.flags]
    faster = [record for record in clean if record.speedup and record.speedup > 1.0 + LATENCY_NOISE]
    smaller = [record for record in clean if record.size_bytes < original.size_bytes]
    smallest = min(smaller, key=lambda record: record.size_bytes).name if smaller else None
    if not faster:
        return {
            "fastest": original.name,
            "smallest": smallest,
            "why": "no compressed artifact was faster than the original within the metric tolerance",
        }
    best = max(faster, key=lambda record: record.speedup)
    metric = f", {best.metric['name']} {best.metric['value']:.2f}" if best.metric else ""
    return {
        "fastest": best.name,
        "smallest": smallest,
        "why": f"{best.name}: {best.speedup:.2f}x faster at batch 1, {best.size_ratio:.2f}x smaller{metric}",
    }


def write_report(
    directory: str | os.PathLike,
    records: list[ArtifactRecord],
    *,
    best: dict[str, Any],
    context: dict[str, Any],
) -> Path:
    """Write ``report.json`` (atomically: a partial file never replaces a good one) and the plots.

    Returns:
        The path of ``report.json``.
    """
    directory = Path(directory)
    payload = {
        **context,
        "artifacts": [record.to_dict() for record in records],
        "best": best,
        "plots": plot_tradeoffs(directory, records),
    }
    path = directory / "report.json"
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(_jsonable(payload), indent=2))
    os.replace(temporary, path)
    return path


def _jsonable(value: Any) -> Any:
    import math

    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def plot_tradeoffs(directory: Path, records: list[ArtifactRecord]) -> dict[str, str]:
    """Size-vs-metric and latency-vs-metric scatter plots (PNG); ``{}`` without a metric."""
    if not all(record.metric for record in records):
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    metric_name = records[0].metric["name"]
    plots = {}
    for key, label, value_of in (
        ("size_vs_metric", "size on disk (KiB)", lambda r: r.size_bytes / 1024),
        ("latency_vs_metric", "latency at batch 1, median (ms)", lambda r: r.latency["batch_1"]["median_ms"]),
    ):
        figure, axes = plt.subplots(figsize=(6.4, 4.4))
        for index, record in enumerate(records):
            colour = "tab:red" if record.flags else ("tab:gray" if record is records[0] else "tab:blue")
            axes.scatter(value_of(record), record.metric["value"], color=colour)
            # Staggered labels: compressed models often share the original's metric exactly.
            axes.annotate(
                record.name,
                (value_of(record), record.metric["value"]),
                fontsize=7,
                xytext=(4, 4 - 11 * (index % 4)),
                textcoords="offset points",
            )
        values = [value_of(record) for record in records]
        if min(values) > 0 and max(values) / min(values) > 8:
            axes.set_xscale("log")  # latencies of eager PyTorch and ONNX Runtime differ tenfold
            axes.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axes.set_xlabel(label)
        axes.set_ylabel(f"{metric_name} ({records[0].metric['split']})")
        threads = records[0].latency["batch_1"]["threads"]
        axes.set_title(
            f"{metric_name} vs {label.split(' (')[0]} — red: flagged; {plural(threads, 'thread')}", fontsize=9
        )
        axes.grid(alpha=0.3)
        figure.tight_layout()
        path = directory / f"{key}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        plots[key] = str(path)
    return plots


def render_table(records: list[ArtifactRecord], best: dict[str, Any]) -> Any:
    """A rich table of the records (for the console)."""
    from rich.table import Table

    from tightfit.units import format_bytes

    first = records[0]
    batches = list(first.latency)
    threads = first.latency[batches[0]]["threads"]
    table = Table(title=f"compression report — latency on CPU, {plural(threads, 'thread')}, median (p90)")
    for column in ("artifact", "format", "size", "gzip", "params", "non-zero"):
        table.add_column(column, justify="left" if column in ("artifact", "format") else "right")
    for batch in batches:
        table.add_column(f"{batch.replace('batch_', 'b')} ms", justify="right")
    table.add_column("samples/s", justify="right")
    table.add_column("speed-up", justify="right")
    if first.metric:
        table.add_column(first.metric["name"], justify="right")
    table.add_column("flags")
    for record in records:
        name = record.name + (" *" if record.name == best.get("fastest") and record is not first else "")
        cells = [
            name,
            record.format,
            format_bytes(record.size_bytes),
            format_bytes(record.gzip_bytes),
            f"{record.parameters:,}" if record.parameters is not None else "-",
            f"{record.nonzero_parameters:,}" if record.nonzero_parameters is not None else "-",
        ]
        for batch in batches:
            latency = record.latency[batch]
            cells.append(f"{latency['median_ms']:.3f} ({latency['p90_ms']:.3f})")
        cells += [f"{record.throughput:,.0f}", f"{record.speedup:.2f}x"]
        if first.metric:
            value = f"{record.metric['value']:.2f}" if record.metric else "-"
            if record.metric_change is not None:
                value += f" ({record.metric_change:+.2f})"
            cells.append(value)
        cells.append(", ".join(_short(flag) for flag in record.flags))
        table.add_row(*cells, style="red" if record.flags else None)
    return table


def _short(flag: str) -> str:
    """A flag in a table cell: ``slower`` or ``metric`` (the full sentence is in report.json)."""
    return "slower" if flag.startswith("slower") else "metric"


def clean_directory(path: Path) -> None:
    """Remove a step's partial output after a failure, so no half-written artifact is kept."""
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
