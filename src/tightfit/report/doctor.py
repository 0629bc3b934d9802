"""The page of a doctor report: is this machine ready to train, and what to fix first.

Made from the dictionary ``tightfit doctor --json`` prints (``run_doctor()``).
"""

from __future__ import annotations

from tightfit.report import page
from tightfit.units import format_bytes

STATUS_TONES = {"ok": "good", "warn": "warn", "fail": "bad", "info": "info"}


def render(data: dict, source: str = "") -> str:
    """The HTML page of a doctor report."""
    sections = []
    if data.get("recommendations"):
        sections.append(
            page.section(
                "What to do",
                "<ol>" + "".join(f"<li>{page.escape(text)}</li>" for text in data["recommendations"]) + "</ol>",
            )
        )
    sections.append(page.section("Checks", _checks(data), note="* critical: a failure makes the verdict 'not ready'"))
    if data.get("dataset"):
        sections.append(page.section("Dataset", _dataset(data["dataset"]), section_id="dataset"))
    sections.append(page.grid(page.section("Machine", _machine(data)), page.section("Best device", _device(data))))
    if isinstance(data.get("packages"), list):
        sections.append(page.section("Packages", _packages(data["packages"])))
    return page.document(
        title="Is this machine ready to train?",
        kind="doctor report",
        verdict_html=_verdict(data),
        sections=sections,
        source=source,
    )


def _verdict(data: dict) -> str:
    verdict = data["verdict"]
    tone = "bad" if not verdict["ready"] else "warn" if verdict["warnings"] else "good"
    device = data.get("best_device") or {}
    memory = data.get("memory") or {}
    counts = {status: sum(check["status"] == status for check in data["checks"]) for status in STATUS_TONES}
    tiles = [
        page.tile(
            "checks", f"{counts['ok']} ok", key="checks", sub=f"{counts['warn']} warnings, {counts['fail']} failed"
        ),
        page.tile("best device", device.get("name", "-"), key="best_device", sub=device.get("description", "")),
        page.tile("usable memory", format_bytes(device.get("usable_bytes")), key="usable_bytes"),
        page.tile(
            "system memory",
            format_bytes(memory.get("total_bytes")),
            key="memory",
            sub=f"{format_bytes(memory.get('available_bytes'))} available",
        ),
    ]
    why = (
        "; ".join(
            filter(
                None,
                [
                    "failed: " + ", ".join(verdict["failed"]) if verdict["failed"] else "",
                    "warnings: " + ", ".join(verdict["warnings"]) if verdict["warnings"] else "",
                ],
            )
        )
        or "every critical check passed"
    )
    return page.verdict(tone, verdict["summary"][:1].upper() + verdict["summary"][1:], why, tiles)


def _checks(data: dict) -> str:
    order = {"fail": 0, "warn": 1, "ok": 2, "info": 3}
    rows = [
        [
            page.Cell(page.badge(STATUS_TONES[check["status"]], check["status"]), sort=order[check["status"]]),
            check["name"] + (" *" if check["critical"] else ""),
            check["summary"],
        ]
        for check in data["checks"]
    ]
    classes = ["flagged" if check["status"] == "fail" else "" for check in data["checks"]]
    return page.table(["status", "check", "details"], rows, row_classes=classes, table_id="checks")


def _machine(data: dict) -> str:
    system, cpu, memory, disk, torch = (data.get(key) or {} for key in ("system", "cpu", "memory", "disk", "torch"))
    pairs = [
        ("Python", f"{system.get('python_version')} ({system.get('python_implementation')})"),
        ("OS", f"{system.get('os')} {system.get('os_release')} ({system.get('architecture')})"),
        ("CPU", f"{cpu.get('model')}, {cpu.get('physical_cores')} cores"),
        (
            "memory",
            f"{format_bytes(memory.get('total_bytes'))}, {format_bytes(memory.get('available_bytes'))} available, "
            f"swap {format_bytes(memory.get('swap_total_bytes'))}",
        ),
        ("disk", f"{format_bytes(disk.get('free_bytes'))} free at {disk.get('path')}"),
        (
            "torch",
            f"{torch.get('version')}" + (f", CUDA build {torch['cuda_build']}" if torch.get("cuda_build") else ""),
        ),
    ]
    return page.facts(pairs)


def _device(data: dict) -> str:
    device = data.get("best_device") or {}
    flops = ", ".join(
        f"{dtype} {value / 1e12:.2f} TFLOP/s" for dtype, value in (device.get("peak_flops") or {}).items()
    )
    pairs = [
        ("profile", device.get("name")),
        ("what", device.get("description")),
        ("memory", format_bytes(device.get("memory_bytes"))),
        ("usable", format_bytes(device.get("usable_bytes"))),
        ("peak", flops or "-"),
        ("bf16", "yes" if device.get("supports_bf16") else "no"),
    ]
    smoke = data.get("smoke_test") or {}
    pairs.append(("smoke test", smoke.get("reason") if smoke.get("skipped") else smoke.get("summary", "ran")))
    return page.facts(pairs)


def _packages(packages: list[dict]) -> str:
    rows, classes = [], []
    for row in packages:
        status = {
            "installed": page.badge("good", row["version"] or "installed"),
            "outdated": page.badge("bad", f"{row['version']} < {row['minimum']}"),
        }.get(row["status"], page.badge("warn", "missing"))
        kind = "required" if row["required"] else (f"[{row['extra']}]" if row["extra"] else "optional")
        install = row.get("install") if row["status"] != "installed" else None
        needed = (
            page.markup("{} <code>{}</code>", row["needed_for"], install) if install else page.escape(row["needed_for"])
        )
        rows.append([row["name"], page.Cell(status, sort=row["status"]), kind, page.Cell(needed)])
        classes.append(
            "flagged" if row["status"] == "outdated" or (row["required"] and row["status"] != "installed") else ""
        )
    return page.table(["package", "version", "kind", "needed for"], rows, row_classes=classes, table_id="packages")


def _dataset(dataset: dict) -> str:
    if "error" in dataset:
        return f"<p>{page.badge('bad', 'error')} {page.escape(dataset['error'])}</p>"
    rows = []
    for name, split in dataset["splits"].items():
        classes = split.get("classes")
        per_class = ", ".join(f"{label} {count}" for label, count in classes.items()) if classes else "-"
        rows.append([name, split["images"], per_class, len(split["corrupt"])])
    problems = [
        page.Html(
            page.badge("bad" if problem["severity"] == "error" else "warn", problem["severity"])
            + page.markup(" {}", problem["message"])
        )
        for problem in dataset.get("problems", [])
    ]
    return (
        f"<p><code>{page.escape(dataset['path'])}</code> ({page.escape(dataset['layout'])})</p>"
        + page.table(["split", "images", "per class", "corrupt"], rows, numeric=(1, 3))
        + (page.lines(problems) if problems else "")
    )
