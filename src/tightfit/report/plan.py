"""The page of a plan: does the model fit, with what, and what the memory is made of.

Made from the dictionary ``tightfit plan --json`` prints (``PlanResult.to_dict()``), or from a
pipeline's (``PipelineResult.to_dict()``: the same for every stage, and one feasibility table).
"""

from __future__ import annotations

from tightfit.report import charts, page
from tightfit.units import format_bytes, format_seconds

# The breakdown's categories in the planner's order (tightfit.memory.report.CATEGORIES, which is
# not imported: that module's package imports torch, and a page is made without it).
# A plan saved before optimizer_temporaries existed lacks it: it is read as 0.
CATEGORIES = ("parameters", "gradients", "optimizer", "optimizer_temporaries", "activations", "overhead")
VERDICT_TONES = {"fits": "good", "tight": "warn", "does not fit": "bad"}


def is_pipeline(data: dict) -> bool:
    return "stages" in data


def render(data: dict, source: str = "") -> str:
    """The HTML page of a plan or of a pipeline plan."""
    if is_pipeline(data):
        return _render_pipeline(data, source)
    sections = [
        page.section(
            "Memory at the peak of one training step",
            _breakdown_chart(data),
            _breakdown_table(data),
            section_id="breakdown",
        ),
        page.section(
            "Alternatives",
            _alternatives(data),
            note="what each other setting would cost; batch = micro-batch x accumulation steps"
            if data.get("alternatives")
            else "",
        ),
        page.section("Details", _details(data)),
    ]
    return page.document(
        title=f"{data['model']} on {data['input']}",
        kind="plan",
        verdict_html=_verdict(data),
        sections=sections,
        source=source,
    )


def _limits(budget: int | None, margin: float) -> list[charts.Limit]:
    if not budget:
        return []
    return [
        charts.Limit(f"usable minus {margin:.0%} margin", budget * (1 - margin), "warn"),
        charts.Limit("usable", budget, "bad"),
    ]


def _bytes_axis(rows: list, budget: int | None) -> charts.Axis:
    return charts.bytes_axis("", max([sum(value for _, value in segments) for _, segments in rows] + [budget or 0]))


def _verdict(data: dict) -> str:
    budget = data.get("budget_bytes")
    headroom = (1 - data["peak_bytes"] / budget) if budget else None
    tiles = [
        page.tile(
            "peak",
            format_bytes(data["peak_bytes"]),
            key="peak_bytes",
            sub=f"at micro-batch {data.get('batch_size') or 1}",
        ),
        page.tile("usable", format_bytes(budget), key="budget_bytes", sub=data["device"]),
        page.tile(
            "headroom",
            page.percent(headroom, 0) if headroom is not None and headroom >= 0 else "none",
            key="headroom",
            sub=f"wanted {data['margin']:.0%}"
            if headroom is None or headroom >= 0
            else f"over by {format_bytes(data['peak_bytes'] - budget)}",
        ),
    ]
    recommendation = data.get("recommendation")
    if recommendation:
        tiles.append(
            page.tile(
                "recommended",
                f"{recommendation['micro_batch_size']} x {recommendation['accumulation_steps']}",
                key="recommended",
                sub=f"{recommendation['precision']}, ckpt {'on' if recommendation['checkpointing'] else 'off'}, "
                f"{recommendation['optimizer']}",
            )
        )
    tiles.append(
        page.tile(
            "est. step",
            format_seconds(data.get("step_time_s")),
            key="step_time",
            sub=f"epoch {format_seconds(data['epoch_time_s'])}" if data.get("epoch_time_s") else "",
        )
    )
    tiles.append(
        page.tile(
            "parameters", f"{data['parameters']:,}", key="parameters", sub=f"{data['trainable_parameters']:,} trainable"
        )
    )
    headline = {"fits": "Fits", "tight": "Tight", "does not fit": "Does not fit"}[data["verdict"]]
    return page.verdict(
        VERDICT_TONES[data["verdict"]],
        f"{headline}: {format_bytes(data['peak_bytes'])} of {format_bytes(budget)} on {data['device']}",
        data["why"],
        tiles,
    )


def _breakdown_chart(data: dict) -> str:
    settings = data.get("recommendation") or {}
    chosen = f"batch {data.get('batch_size') or 1}" + (f", {settings['precision']}" if settings else "")
    rows = [(chosen, [(name, data["breakdown"].get(name, 0)) for name in CATEGORIES])]
    for option in data.get("alternatives", []):
        if option.get("peak_bytes"):
            label = f"{option['precision']}, ckpt {'on' if option['checkpointing'] else 'off'}, {option['optimizer']}"
            rows.append((label, [("alternative (total)", option["peak_bytes"])]))
    return charts.stacked_bars(
        rows,
        limits=_limits(data.get("budget_bytes"), data["margin"]),
        format_value=format_bytes,
        axis=_bytes_axis(rows, data.get("budget_bytes")),
        label="memory breakdown",
        caption="the first bar is the answer, split by what holds the memory; the others are the alternatives' totals",
    )


def _breakdown_table(data: dict) -> str:
    peak = data["peak_bytes"] or 1
    rows = [
        [
            name,
            page.Cell(format_bytes(data["breakdown"].get(name, 0)), sort=data["breakdown"].get(name, 0), numeric=True),
            page.Cell(
                page.percent(data["breakdown"].get(name, 0) / peak, 0),
                sort=data["breakdown"].get(name, 0),
                numeric=True,
            ),
        ]
        for name in CATEGORIES
    ]
    moment = f" ({data['peak_moment']})" if data.get("peak_moment") else ""
    rows.append(
        [
            page.Cell(page.markup("<b>peak{}</b>", moment)),
            page.Cell(
                page.markup("<b>{}</b>", format_bytes(data["peak_bytes"])), sort=data["peak_bytes"], numeric=True
            ),
            page.Cell("100 %", sort=data["peak_bytes"], numeric=True),
        ]
    )
    return page.table(["category", "bytes", "share"], rows, sortable=False, table_id="breakdown-table")


def _alternatives(data: dict) -> str:
    options = data.get("alternatives") or []
    if not options:
        return '<p class="note">None: the settings were fixed.</p>'
    rows, classes = [], []
    for option in options:
        fits = option.get("fits")
        state = (
            page.badge("good", "fits")
            if fits
            else page.badge("bad", "does not fit")
            if fits is False
            else page.badge("info", "not estimated")
        )
        batch = f"{option['micro_batch_size']} x {option['accumulation_steps']}" if fits else "-"
        rows.append(
            [
                option["precision"],
                "on" if option["checkpointing"] else "off",
                option["optimizer"],
                page.Cell(state),
                page.Cell(batch, sort=option["micro_batch_size"], numeric=True),
                page.Cell(format_bytes(option.get("peak_bytes")), sort=option.get("peak_bytes") or 0, numeric=True),
                page.Cell(format_seconds(option.get("step_time_s")), sort=option.get("step_time_s") or 0, numeric=True),
                option.get("note") or "",
            ]
        )
        classes.append("" if fits is not False else "flagged")
    return page.table(
        ["precision", "ckpt", "optimizer", "verdict", "batch", "peak", "est. step", "note"],
        rows,
        row_classes=classes,
        table_id="alternatives",
    )


def _details(data: dict) -> str:
    pairs = [
        ("model", data["model"]),
        ("input", data["input"]),
        ("device", data["device"]),
        ("method", data.get("method")),
        ("FLOPs per optimizer step", f"{data['flops_per_step']:,}" if data.get("flops_per_step") else "-"),
        ("planned in", format_seconds(data.get("seconds"))),
    ]
    measured = data.get("measured")
    if measured:
        pairs += [
            ("measured on", f"{measured['device']} at batch {measured['batch_size']}"),
            ("measured step", format_seconds(measured["step_time_s"])),
            ("measured peak", format_bytes(measured["peak_bytes"])),
        ]
    notes = page.lines(data.get("notes") or [])
    return page.facts(pairs) + '<h3 style="font-size:.9rem">How it was estimated</h3>' + notes


def _render_pipeline(data: dict, source: str) -> str:
    stages = data["stages"]
    counts = {verdict: sum(stage["verdict"] == verdict for stage in stages) for verdict in VERDICT_TONES}
    tone = "bad" if counts["does not fit"] else "warn" if counts["tight"] else "good"
    if counts["does not fit"]:
        failing = ", ".join(stage["name"] for stage in stages if stage["verdict"] == "does not fit")
        headline = f"{counts['does not fit']} of {len(stages)} stages do not fit: {failing}"
    elif counts["tight"]:
        headline = f"Every stage fits, {counts['tight']} tightly"
    else:
        headline = f"All {len(stages)} stages fit on {data['device']}"
    highest = max(stages, key=lambda stage: stage["peak_bytes"] if stage["kind"] == "train" else 0)
    tiles = [
        page.tile(
            "stages",
            str(len(stages)),
            key="stages",
            sub=f"{counts['fits']} fit, {counts['tight']} tight, {counts['does not fit']} do not",
        ),
        page.tile("highest peak", format_bytes(highest["peak_bytes"]), key="peak_bytes", sub=highest["name"]),
        page.tile(
            "usable",
            format_bytes(data["budget_bytes"]),
            key="budget_bytes",
            sub=f"{data['device']}, margin {data['margin']:.0%}",
        ),
    ]
    epoch_total = sum(stage.get("epoch_time_s") or 0 for stage in stages)
    if epoch_total:
        tiles.append(page.tile("est. epochs, all stages", format_seconds(epoch_total), key="epoch_time"))
    verdict_html = page.verdict(
        tone, headline, f"planned in {format_seconds(data.get('seconds'))} on fake tensors", tiles
    )

    train_stages = [stage for stage in stages if stage["kind"] == "train" and stage.get("plan")]
    charted = [
        stage
        for stage in stages
        if stage["kind"] in ("train", "extract") and (stage.get("plan") or {}).get("breakdown")
    ]
    rows = [
        (stage["name"], [(name, stage["plan"]["breakdown"].get(name, 0)) for name in CATEGORIES]) for stage in charted
    ]
    chart = charts.stacked_bars(
        rows,
        limits=_limits(data["budget_bytes"], data["margin"]),
        format_value=format_bytes,
        axis=_bytes_axis(rows, data["budget_bytes"]),
        label="memory per stage",
        caption="peak of one training step (extract: one forward batch) per stage, at the chosen settings",
    )
    table_rows, classes = [], []
    for stage in stages:
        batch = f"{stage['micro_batch_size']} x {stage['accumulation_steps']}" if stage.get("micro_batch_size") else "-"
        peak = format_bytes(stage["peak_bytes"]) + (" RAM" if stage["kind"] == "cpu" else "")
        checkpointing = "-" if stage.get("checkpointing") is None else ("on" if stage["checkpointing"] else "off")
        table_rows.append(
            [
                stage["name"],
                page.Cell(page.badge(VERDICT_TONES[stage["verdict"]], stage["verdict"]), sort=stage["verdict"]),
                stage.get("model") or "CPU stage",
                page.Cell(batch, sort=stage.get("micro_batch_size") or 0, numeric=True),
                stage.get("precision") or "-",
                checkpointing,
                page.Cell(peak, sort=stage["peak_bytes"], numeric=True),
                page.Cell(format_seconds(stage.get("step_time_s")), sort=stage.get("step_time_s") or 0, numeric=True),
                page.Cell(format_seconds(stage.get("epoch_time_s")), sort=stage.get("epoch_time_s") or 0, numeric=True),
            ]
        )
        classes.append("flagged" if stage["verdict"] == "does not fit" else "")
    why = page.lines(
        [
            page.Html(
                page.markup("<b>{}</b>: {}", stage["name"], stage["why"])
                + (page.markup(' <span class="note">({})</span>', stage["note"]) if stage.get("note") else "")
            )
            for stage in stages
        ]
    )
    sections = [
        page.section("Memory per stage", chart),
        page.section(
            "Feasibility",
            page.table(
                ["stage", "verdict", "model", "batch", "precision", "ckpt", "peak", "est. step", "est. epoch"],
                table_rows,
                row_classes=classes,
                table_id="stages",
            ),
            note="batch = micro-batch x accumulation steps; times are estimates; peaks include the device overhead",
        ),
        page.section("Why", why),
    ]
    alternatives = [
        f"<details><summary>{page.escape(stage['name'])}</summary>{_alternatives(stage['plan'])}</details>"
        for stage in train_stages
        if stage["plan"].get("alternatives")
    ]
    if alternatives:
        sections.append(
            page.section("Alternatives per stage", *alternatives, note="what each other setting would cost")
        )
    return page.document(
        title=data["name"], kind="pipeline plan", verdict_html=verdict_html, sections=sections, source=source
    )
