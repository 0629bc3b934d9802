"""The page of a compression run: what each step bought in size, speed and accuracy.

Made from ``report.json`` as ``tightfit compress`` writes it (``compression/report.py``): one
record per artifact (the original first), the best artifact named, flags on the steps that were
slower than the original or lost more than the tolerance.
"""

from __future__ import annotations

from tightfit.report import charts, page
from tightfit.units import format_bytes, format_seconds


def render(data: dict, source: str = "") -> str:
    """The HTML page of a compression report."""
    artifacts = data["artifacts"]
    best = data.get("best") or {}
    sections = []
    if all(artifact.get("metric") for artifact in artifacts):
        sections.append(
            page.grid(
                page.section("Size vs " + _metric_name(data), _scatter(data, "size")),
                page.section("Latency vs " + _metric_name(data), _scatter(data, "latency")),
            )
        )
    sections.append(
        page.section(
            "Every artifact, measured the same way",
            _table(data),
            note=f"latency: median at batch 1 on the CPU, threads: {data.get('threads')}; "
            "speed-up and size are against the original; red rows are flagged",
        )
    )
    flagged = [artifact for artifact in artifacts if artifact.get("flags")]
    if flagged:
        sections.append(
            page.section(
                "Flagged", page.lines(f"{artifact['name']}: {'; '.join(artifact['flags'])}" for artifact in flagged)
            )
        )
    if data.get("decisions"):
        sections.append(
            page.section("Decisions taken on the way", page.lines(str(decision) for decision in data["decisions"]))
        )
    sections.append(page.section("Setup", _setup(data)))
    return page.document(
        title=str(data.get("model_spec") or "compression"),
        kind="compression run",
        verdict_html=_verdict(data, best),
        sections=sections,
        source=source,
    )


def _metric_name(data: dict) -> str:
    metric = data.get("metric") or {}
    return metric.get("name", "metric")


def _by_name(data: dict) -> dict[str, dict]:
    return {artifact["name"]: artifact for artifact in data["artifacts"]}


def _metric_text(artifact: dict) -> str:
    metric = artifact.get("metric")
    if not metric:
        return "-"
    return f"{metric['value']:.2f} %" if metric["name"] == "accuracy" else f"{metric['value']:.4g}"


def _verdict(data: dict, best: dict) -> str:
    artifacts = _by_name(data)
    original = data["artifacts"][0]
    fastest = artifacts.get(best.get("fastest"))
    smallest = artifacts.get(best.get("smallest"))
    tiles = []
    if fastest is not None:
        tiles.append(page.tile("best artifact", fastest["name"], key="best_artifact", sub=fastest["format"]))
        tiles.append(page.tile("speed-up", f"{fastest['speedup']:.2f}x", key="speedup", sub="at batch 1"))
        tiles.append(
            page.tile(
                "smaller by",
                f"{fastest['size_ratio']:.2f}x",
                key="size_ratio",
                sub=f"{format_bytes(original['size_bytes'])} → {format_bytes(fastest['size_bytes'])}",
            )
        )
        change = fastest.get("metric_change")
        tiles.append(
            page.tile(
                _metric_name(data),
                _metric_text(fastest),
                key="metric",
                sub=f"{change:+.2f} vs original" if change is not None else "the original",
            )
        )
    if smallest is not None and smallest is not fastest:
        tiles.append(page.tile("smallest", smallest["name"], key="smallest", sub=format_bytes(smallest["size_bytes"])))
    flagged = sum(bool(artifact.get("flags")) for artifact in data["artifacts"])
    tiles.append(page.tile("flagged steps", str(flagged), key="flagged", sub=f"of {len(data['artifacts']) - 1}"))
    if fastest is None or fastest is original:
        return page.verdict("warn", "Nothing beat the original", best.get("why", ""), tiles)
    return page.verdict(
        "good",
        f"Best: {fastest['name']} — {fastest['speedup']:.1f}x faster, {fastest['size_ratio']:.1f}x smaller",
        best.get("why", ""),
        tiles,
    )


def _style(artifact: dict, index: int) -> str:
    if index == 0:
        return "muted"
    return "bad" if artifact.get("flags") else "s0"


def _scatter(data: dict, against: str) -> str:
    best = (data.get("best") or {}).get("fastest")
    points = []
    for index, artifact in enumerate(data["artifacts"]):
        x = artifact["size_bytes"] if against == "size" else artifact["latency"]["batch_1"]["median_ms"]
        points.append(
            charts.Point(
                _short_name(artifact["name"]),
                x,
                artifact["metric"]["value"],
                _style(artifact, index),
                best=artifact["name"] == best and index > 0,
                title=artifact["name"],
            )
        )
    if against == "size":
        x_axis = charts.bytes_axis("size on disk", max(point.x for point in points))
    else:
        x_axis = charts.Axis("latency at batch 1 (ms, median)", lambda value: f"{value:.2g}")
    y_axis = charts.Axis(_metric_name(data), lambda value: f"{value:.1f}")
    return charts.scatter(
        points,
        x_axis=x_axis,
        y_axis=y_axis,
        label=f"{against} vs metric",
        caption="ringed: the best artifact; red: flagged; grey: the original. Up and left is better.",
    )


def _short_name(name: str) -> str:
    """``03-export onnx int8 (static)`` -> ``onnx int8 (static)``: the step number is in the table."""
    head, _, rest = name.partition(" ")
    return rest if head[:2].isdigit() and rest else name


def _table(data: dict) -> str:
    best = (data.get("best") or {}).get("fastest")
    rows, classes = [], []
    for artifact in data["artifacts"]:
        latency = artifact["latency"]
        larger = max(latency, key=lambda key: latency[key]["batch_size"])
        nonzero = artifact.get("nonzero_parameters")
        rows.append(
            [
                artifact["name"],
                artifact["format"],
                page.Cell(format_bytes(artifact["size_bytes"]), sort=artifact["size_bytes"], numeric=True),
                page.Cell(f"{artifact['size_ratio']:.2f}x", sort=artifact["size_ratio"], numeric=True),
                page.Cell(f"{nonzero:,}" if nonzero is not None else "-", sort=nonzero or 0, numeric=True),
                page.Cell(f"{latency['batch_1']['median_ms']:.3f}", sort=latency["batch_1"]["median_ms"], numeric=True),
                page.Cell(f"{artifact['speedup']:.2f}x", sort=artifact["speedup"], numeric=True),
                page.Cell(f"{latency[larger]['median_ms']:.2f}", sort=latency[larger]["median_ms"], numeric=True),
                page.Cell(f"{artifact['throughput']:,.0f}", sort=artifact["throughput"], numeric=True),
                page.Cell(_metric_text(artifact), sort=(artifact.get("metric") or {}).get("value", 0), numeric=True),
                page.Cell(
                    f"{artifact['metric_change']:+.2f}" if artifact.get("metric_change") is not None else "-",
                    sort=artifact.get("metric_change") or 0,
                    numeric=True,
                ),
                page.Cell(
                    page.badge("good", "best")
                    if artifact["name"] == best
                    else page.Html(
                        " ".join(
                            page.badge("bad", "slower" if flag.startswith("slower") else "metric")
                            for flag in artifact.get("flags", [])
                        )
                    )
                ),
            ]
        )
        classes.append("best" if artifact["name"] == best else "flagged" if artifact.get("flags") else "")
    larger_batch = max(data["artifacts"][0]["latency"].values(), key=lambda entry: entry["batch_size"])["batch_size"]
    headers = [
        "artifact",
        "format",
        "size",
        "smaller",
        "non-zeros",
        "ms @1",
        "speed-up",
        f"ms @{larger_batch}",
        "samples/s",
        _metric_name(data),
        "change",
        "",
    ]
    return page.table(headers, rows, row_classes=classes, table_id="artifacts")


def _setup(data: dict) -> str:
    recipe = data.get("recipe") or {}
    steps = " → ".join(step["step"] for step in recipe.get("steps", []))
    metric = data.get("metric") or {}
    load = (data.get("machine_load") or {}).get("before") or {}
    pairs = [
        ("source", data.get("source")),
        ("model", data.get("model_spec")),
        ("steps", steps or "-"),
        (
            "metric",
            f"{metric.get('name')} on {metric.get('samples')} {metric.get('split')} samples, tolerance "
            f"{metric.get('tolerance')}",
        ),
        ("threads", data.get("threads")),
        ("torch", data.get("torch")),
        ("machine load before", f"{load.get('load_1min')} on {load.get('cores')} cores" if load else "-"),
        ("took", format_seconds(data.get("seconds"))),
    ]
    warnings = [text for text in ((data.get("cpu") or {}).get("warning"), load.get("warning")) if text]
    return page.facts(pairs) + (page.lines(warnings) if warnings else "")
