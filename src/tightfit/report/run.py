"""The page of a training run: did it train, how well, in what memory, how fast.

Reads only what the run folder holds: ``summary.json`` (absent while a run is going or after a
crash: the page then says so and shows the curves so far), ``metrics.jsonl`` (the curves and the
resource monitor's samples), ``config.yaml`` and ``checkpoints/*/meta.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tightfit.errors import ConfigError
from tightfit.report import charts, page
from tightfit.units import format_bytes, format_seconds

# The monitor's memory series, the device's own first: (metrics.jsonl key, legend name).
MEMORY_SERIES = (
    ("memory/cuda_allocated_bytes", "CUDA allocated"),
    ("memory/cuda_reserved_bytes", "CUDA reserved"),
    ("memory/mps_allocated_bytes", "MPS allocated"),
    ("memory/mps_driver_bytes", "MPS driver"),
    ("memory/rss_bytes", "process RSS"),
)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a torn last line, from a killed run, is skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


# the summary fields the page reads without a default (the trainer always writes them)
SUMMARY_FIELDS = (
    "steps",
    "epochs",
    "wall_time_s",
    "samples_per_s",
    "micro_batch_size",
    "accumulation_steps",
    "effective_batch_size",
    "precision",
    "device",
)


def _read_file(path: Path, parse) -> Any:
    """``parse(text)`` of a run file, or a one-line error naming the damaged file."""
    import yaml

    try:
        return parse(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, yaml.YAMLError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{path} is damaged ({first})") from None


def render(run_dir: Path) -> str:
    """The HTML page of the run in ``run_dir``.

    Raises:
        ConfigError: ``summary.json``, ``config.yaml`` or a checkpoint's ``meta.json`` is damaged.
    """
    import yaml

    summary_path = run_dir / "summary.json"
    summary = _read_file(summary_path, json.loads) if summary_path.is_file() else None
    config_path = run_dir / "config.yaml"
    config = (_read_file(config_path, yaml.safe_load) or {}) if config_path.is_file() else {}
    config_text = config_path.read_text(encoding="utf-8") if config_path.is_file() else ""
    if not isinstance(summary, (dict, type(None))) or not isinstance(config, dict):
        raise ConfigError(f"{run_dir}: summary.json or config.yaml does not hold a mapping")
    missing = [key for key in SUMMARY_FIELDS if summary is not None and key not in summary]
    if missing:
        raise ConfigError(f"{summary_path} is damaged (missing {', '.join(missing)}): not a summary tightfit wrote")
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [record for record in records if record.get("stage") == "train"]
    val = [record for record in records if record.get("stage") == "val"]
    test = next((record for record in reversed(records) if record.get("stage") == "test"), {})

    sections = [
        page.grid(
            page.section("Loss", _loss_chart(train, val)),
            page.section("Accuracy", _accuracy_chart(val, summary or test)),
        ),
        page.section("Memory over the run", _memory_chart(train, summary, config), section_id="memory"),
        page.grid(
            page.section("Throughput", _series_chart(train, "samples_per_s", "samples/s", "s2")),
            page.section("Learning rate", _series_chart(train, "lr", "learning rate", "s3")),
        ),
        page.grid(
            page.section("Diagnosis", page.lines(_diagnosis(summary, train, val))),
            page.section("Checkpoints kept", _checkpoints(run_dir, summary)),
        ),
        page.section("Resource monitor", _monitor(train, summary)),
        page.section(
            "Configuration",
            f"<details><summary>config.yaml ({len(config_text.splitlines())} lines)</summary>"
            f"<pre>{page.escape(config_text)}</pre></details>"
            if config_text
            else '<p class="note">no config.yaml</p>',
        ),
    ]
    return page.document(
        title=str(config.get("model") or run_dir.name),
        kind="training run",
        verdict_html=_verdict(summary, train, val),
        sections=sections,
        source=str(run_dir),
    )


def _verdict(summary: dict | None, train: list[dict], val: list[dict]) -> str:
    if summary is None:
        last = train[-1]["step"] if train else 0
        return page.verdict(
            "warn",
            "Unfinished run",
            f"no summary.json: the run is still going or stopped early (last logged step {last}). "
            "The curves show what was logged.",
        )
    tiles = []
    accuracy = summary.get("test_accuracy")
    if accuracy is not None:
        tiles.append(
            page.tile(
                "test accuracy",
                page.percent(accuracy),
                key="test_accuracy",
                sub=f"top-5 {page.percent(summary['test_top5_accuracy'])}"
                if summary.get("test_top5_accuracy") is not None
                else "",
            )
        )
    if summary.get("test_loss") is not None:
        tiles.append(page.tile("test loss", f"{summary['test_loss']:.4g}", key="test_loss"))
    best = summary.get("best_metric")
    if best:
        tiles.append(page.tile(f"best {best['name']}", f"{best['value']:.4g}", key="best_metric"))
    peak_name, peak_bytes = _headline_peak(summary)
    if peak_bytes:
        tiles.append(page.tile("peak memory", format_bytes(peak_bytes), key="peak_bytes", sub=peak_name))
    tiles.append(
        page.tile(
            "wall time",
            format_seconds(summary["wall_time_s"]),
            key="wall_time",
            sub=f"{summary['samples_per_s']:.0f} samples/s",
        )
    )
    tiles.append(
        page.tile(
            "steps / epochs",
            f"{summary['steps']} / {summary['epochs']}",
            key="steps",
            sub=f"batch {summary['micro_batch_size']} x {summary['accumulation_steps']}, {summary['precision']} on "
            f"{summary['device']}",
        )
    )
    problems = []
    if summary.get("skipped_steps"):
        problems.append(f"{summary['skipped_steps']} steps skipped (non-finite loss or gradients)")
    if summary.get("oom_recoveries"):
        problems.append(f"{summary['oom_recoveries']} out-of-memory recoveries")
    if "diagnosis" in summary:  # the run's own reading of its curves (training/diagnosis.py)
        problems[:0] = [f"{finding['finding']}: {finding['evidence']}" for finding in summary["diagnosis"]]
    elif _loss_barely_moved(train, val):  # a run from before the trainer diagnosed itself
        problems.insert(
            0, "the loss barely moved: the model has not learnt (too few steps, or a learning rate or data problem)"
        )
    if accuracy is not None:
        headline = f"Trained: {page.percent(accuracy)} test accuracy"
    elif summary.get("test_loss") is not None:
        headline = f"Trained: test loss {summary['test_loss']:.4g}"
    else:
        headline = "Trained (no test split)"
    why = f"{summary['steps']} steps in {format_seconds(summary['wall_time_s'])}"
    if summary.get("stop_reason"):
        why += f"; stopped: {summary['stop_reason']}"
    if problems:
        return page.verdict("warn", headline + " — with warnings", why + "; " + "; ".join(problems), tiles)
    return page.verdict("good", headline, why + "; no skipped steps, no out-of-memory.", tiles)


def _loss_barely_moved(train: list[dict], val: list[dict]) -> bool:
    """Whether the loss ended within 5 % of where it started (validation loss if logged twice, else training loss)."""
    for losses in (_points(val, "val_loss"), _points(train, "train_loss")):
        finite = [loss for _, loss in losses if math.isfinite(loss)]
        if len(finite) >= 2:
            return finite[-1] >= 0.95 * finite[0]
    return False


def _headline_peak(summary: dict) -> tuple[str, int | None]:
    """The peak a reader cares about: the device's own where there is one, else the process RSS."""
    peaks = summary.get("peak_memory_bytes") or {}
    for name, label in (
        ("cuda_allocated", "CUDA allocated (tensors)"),
        ("mps_allocated", "MPS allocated"),
        ("process_rss", "process RSS"),
    ):
        if peaks.get(name):
            return label, peaks[name]
    return "", None


def _points(records: list[dict], key: str) -> list[tuple[float, float]]:
    return [(record["step"], float(record[key])) for record in records if record.get(key) is not None]


def _loss_chart(train: list[dict], val: list[dict]) -> str:
    series = [
        charts.Series("train loss", _points(train, "train_loss"), "s0"),
        charts.Series("validation loss", _points(val, "val_loss"), "s1"),
    ]
    log = all(y > 0 for line in series for _, y in line.points) and _spread(series) > 20
    return charts.line_chart(
        series,
        x_axis=charts.Axis("optimizer step"),
        y_axis=charts.Axis("loss", _short, log=log),
        label="loss curves",
        caption="log scale" if log else "",
    )


def _spread(series: list[charts.Series]) -> float:
    values = [y for line in series for _, y in line.points if y > 0]
    return max(values) / min(values) if values else 1.0


def _accuracy_chart(val: list[dict], final: dict) -> str:
    series = [
        charts.Series("validation accuracy", _points(val, "val_accuracy"), "s1"),
        charts.Series("validation top-5", _points(val, "val_top5_accuracy"), "s4", dashed=True),
    ]
    limits = [charts.Limit("test", final["test_accuracy"], "good")] if final.get("test_accuracy") is not None else []
    if not any(line.points for line in series):
        return '<p class="note">No accuracy logged (a task without classes, or no validation split).</p>'
    return charts.line_chart(
        series,
        x_axis=charts.Axis("optimizer step"),
        y_axis=charts.Axis("accuracy", lambda v: f"{v * 100:.3g} %"),
        limits=limits,
        label="accuracy curves",
        caption="the test accuracy is measured once, at the end, on the best checkpoint",
    )


def _memory_chart(train: list[dict], summary: dict | None, config: dict) -> str:
    series = [charts.Series(name, _points(train, key), f"s{index}") for index, (key, name) in enumerate(MEMORY_SERIES)]
    limits = []
    planned = (summary or {}).get("batch_search_peak_bytes")
    if planned:
        limits.append(charts.Limit("batch search: step peak", planned, "warn"))
    budget = config.get("budget")
    if budget is not None:
        from tightfit.units import parse_memory

        limits.append(charts.Limit("budget", parse_memory(budget, where="budget"), "bad"))
    notes = []
    if any(key == "memory/rss_bytes" and _points(train, key) for key, _ in MEMORY_SERIES) and not any(
        _points(train, key) for key, _ in MEMORY_SERIES[:4]
    ):
        notes.append(
            "On CPU the process RSS is what the monitor sees: it includes the Python and torch runtime, "
            "the data and the model, so it sits above the tensor peak of a step."
        )
    if not planned:
        notes.append(
            "No planned peak in this run (the micro-batch was fixed): batch.micro_batch_size=auto records the "
            "peak the batch-size search found; `tightfit plan --model ... --batch-size N --html plan.html` makes a "
            "plan page."
        )
    largest = max([y for line in series for _, y in line.points] + [limit.value for limit in limits] + [1])
    return charts.line_chart(
        series,
        x_axis=charts.Axis("optimizer step"),
        y_axis=charts.bytes_axis("memory", largest),
        limits=limits,
        label="memory over the run",
        caption=" ".join(notes),
        width=charts.WIDE,
    )


def _series_chart(train: list[dict], key: str, title: str, style: str) -> str:
    return charts.line_chart(
        [charts.Series(title, _points(train, key), style)],
        x_axis=charts.Axis("optimizer step"),
        y_axis=charts.Axis(title, _short),
        label=title,
    )


def _short(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value / 1000:g}k"
    return f"{value:.3g}"


def _diagnosis(summary: dict | None, train: list[dict], val: list[dict]) -> list[str]:
    """What a careful reader would say looking at the numbers, one sentence each: the run's own
    ``diagnosis`` (``training/diagnosis.py``) when its summary has one; for older or unfinished
    runs, a rougher reading of the logged points."""
    found = []
    if summary is None:
        found.append(
            "The run has no summary: it is still going, was interrupted, or failed. Resume it with "
            "tightfit train --resume RUN_DIR."
        )
    else:
        found.append(f"precision {summary['precision']}: {summary.get('precision_reason') or 'as configured'}")
        found.append(
            f"batch: micro-batch {summary['micro_batch_size']} x {summary['accumulation_steps']} accumulation steps "
            f"= {summary['effective_batch_size']} samples per optimizer step"
        )
        if summary.get("oom_recoveries"):
            found.append(
                f"out of memory {summary['oom_recoveries']} times: the micro-batch was halved each time "
                "(the effective batch did not change)"
            )
        if summary.get("skipped_steps"):
            found.append(
                f"{summary['skipped_steps']} optimizer steps skipped: the loss or the gradients were not finite"
            )
        if summary.get("stop_reason"):
            found.append(f"stopped before the last epoch: {summary['stop_reason']}")
    train_losses = _points(train, "train_loss")
    non_finite = [step for step, loss in train_losses if not math.isfinite(loss)]
    if non_finite:
        found.append(f"non-finite training loss logged at steps {', '.join(str(int(step)) for step in non_finite[:5])}")
    if summary is not None and "diagnosis" in summary:
        found += [
            f"{finding['finding']}: {finding['evidence']}; {finding['advice']}" for finding in summary["diagnosis"]
        ]
        if not summary["diagnosis"]:
            found.append("the curves show no flat loss, no overfitting and no underfitting (the run's own diagnosis)")
        return found
    val_losses = _points(val, "val_loss")
    if len(val_losses) >= 3:
        best_step, best = min(val_losses, key=lambda point: point[1])
        last_step, last = val_losses[-1]
        if last > best * 1.1 and last_step > best_step:
            found.append(
                f"validation loss rose {last / best - 1:.0%} after step {best_step} (overfitting?): "
                "the test ran on the best checkpoint"
            )
        else:
            found.append(f"validation loss lowest at step {best_step} ({best:.4g}); no sign of overfitting")
    if _loss_barely_moved(train, val):
        found.append(
            "the loss ended within 5 % of where it started: train longer, or check the learning rate and the data"
        )
    return found


def _checkpoints(run_dir: Path, summary: dict | None) -> str:
    folder = run_dir / "checkpoints"
    rows = []
    for directory in sorted(folder.iterdir()) if folder.is_dir() else []:
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            continue
        meta = _read_file(meta_path, json.loads)
        size = sum(file.stat().st_size for file in directory.rglob("*") if file.is_file())
        metrics = ", ".join(f"{name} {value:.4g}" for name, value in meta.get("metrics", {}).items())
        rows.append(
            [
                directory.name,
                page.Cell(str(meta.get("step")), sort=meta.get("step"), numeric=True),
                metrics or "-",
                page.Cell(format_bytes(size), sort=size, numeric=True),
            ]
        )
    if not rows:
        return '<p class="note">No checkpoints.</p>'
    best = Path(summary["best_checkpoint"]).name if summary and summary.get("best_checkpoint") else None
    classes = ["best" if row[0] == best else "" for row in rows]
    note = f'<p class="note">best: <code>{page.escape(summary["best_checkpoint"])}</code></p>' if best else ""
    return page.table(["name", "step", "metrics", "size"], rows, row_classes=classes, table_id="checkpoints") + note


def _monitor(train: list[dict], summary: dict | None) -> str:
    available = charts.Series("system memory available", _points(train, "memory/system_available_bytes"), "s4")
    utilisation = _points(train, "gpu/utilization_percent")
    largest = max([y for _, y in available.points] + [1])
    parts = [
        charts.line_chart(
            [available],
            x_axis=charts.Axis("optimizer step"),
            y_axis=charts.bytes_axis("available", largest),
            label="system memory available",
            caption="system memory available, as the monitor sampled it",
        )
    ]
    if utilisation:
        parts.append(
            charts.line_chart(
                [charts.Series("GPU utilisation", utilisation, "s2")],
                x_axis=charts.Axis("optimizer step"),
                y_axis=charts.Axis("GPU %", lambda v: f"{v:.0f}", from_zero=True),
                label="GPU utilisation",
            )
        )
    if summary:
        peaks = [
            (name.replace("_", " "), format_bytes(value))
            for name, value in (summary.get("peak_memory_bytes") or {}).items()
            if value
        ]
        parts.append(
            page.facts(
                peaks
                + [
                    ("samples/s (whole run)", f"{summary['samples_per_s']:.0f}"),
                    ("processes", summary.get("world_size", 1)),
                ]
            )
        )
    return '<div class="grid2">' + "".join(f"<div>{part}</div>" for part in parts) + "</div>"
