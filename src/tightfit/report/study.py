"""The page of a study: which stages were feasible, which arm and classifier won, and whether the
win is more than chance.

Made from a study's ``results.json``. The fields read (the schema is in docs/report.md)::

    study: name                       device: profile name (optional)
    primary_metric: accuracy          (a key of every result's metrics)
    stages: [{name, kind, status (done | skipped | failed), verdict (fits | tight | does not fit),
              peak_bytes, budget_bytes, seconds, note}]
    results: [{arm, classifier, metrics: {NAME: {value, ci_low, ci_high}}, labels: [...],
               confusion_matrix: [[count, ...], ...]  (rows: true class, columns: predicted)}]
    paired_tests: {metric, test, alpha, correction,
                   comparisons: [{a, b, difference, p_value}]}   (a, b: "arm / classifier")

Metric values are fractions (0.91, not 91); confidence intervals are 95 %.
"""

from __future__ import annotations

from tightfit.report import charts, page
from tightfit.units import format_bytes, format_seconds

STATUS_TONES = {"done": "good", "skipped": "info", "failed": "bad"}
VERDICT_TONES = {"fits": "good", "tight": "warn", "does not fit": "bad"}


def is_study(data: dict) -> bool:
    return "results" in data and "stages" in data


def result_name(result: dict) -> str:
    """How a result is named everywhere on the page and in ``paired_tests``: ``arm / classifier``."""
    return f"{result['arm']} / {result['classifier']}"


def render(data: dict, source: str = "") -> str:
    """The HTML page of a study's results."""
    metric = data.get("primary_metric") or _first_metric(data)
    ranked = sorted(data["results"], key=lambda result: _value(result, metric), reverse=True)
    best = ranked[0] if ranked else None
    sections = [
        page.section(f"{metric} with 95 % confidence intervals", _forest(ranked, metric, best), section_id="results-chart"),
        page.section("Results", _results_table(ranked, best), note="value [95 % CI]; sort by a column with a click"),
    ]
    tests = data.get("paired_tests")
    if tests and tests.get("comparisons"):
        sections.append(page.section("Paired tests", _paired_matrix(tests, [result_name(result) for result in ranked]), section_id="paired"))
    sections.append(page.section("Stages", _stages(data["stages"]), section_id="stages"))
    with_matrix = [result for result in ranked if result.get("confusion_matrix")]
    if with_matrix:
        sections.append(page.section("Confusion matrices", "<div class=\"grid2\">" + "".join(
            f"<div><b>{page.escape(result_name(result))}</b>{_confusion(result)}</div>" for result in with_matrix) + "</div>",
            note="rows: true class, columns: predicted class; best result first"))
    return page.document(title=str(data.get("study") or "study"), kind="study", verdict_html=_verdict(data, ranked, metric),
                         sections=sections, source=source)


def _first_metric(data: dict) -> str:
    for result in data["results"]:
        for name in result.get("metrics", {}):
            return name
    return "metric"


def _value(result: dict, metric: str) -> float:
    entry = result.get("metrics", {}).get(metric)
    return entry["value"] if entry else float("-inf")


def _interval(entry: dict | None) -> str:
    if not entry:
        return "-"
    text = page.percent(entry["value"])
    if entry.get("ci_low") is not None and entry.get("ci_high") is not None:
        text += f" [{entry['ci_low'] * 100:.1f}, {entry['ci_high'] * 100:.1f}]"
    return text


def _verdict(data: dict, ranked: list[dict], metric: str) -> str:
    stages = data["stages"]
    failed = [stage["name"] for stage in stages if stage.get("status") == "failed" or stage.get("verdict") == "does not fit"]
    tiles = [page.tile("stages", f"{sum(stage.get('status') == 'done' for stage in stages)} / {len(stages)} done", key="stages",
                       sub=f"{len(failed)} failed or infeasible")]
    if not ranked:
        return page.verdict("bad", "No results", "no arm produced a result", tiles)
    best = ranked[0]
    entry = best["metrics"][metric]
    tiles.insert(0, page.tile(f"best {metric}", page.percent(entry["value"]), key="best_metric",
                              sub=f"95 % CI {_interval(entry).partition(' [')[2].rstrip(']') or '-'}"))
    tiles.insert(1, page.tile("best", result_name(best), key="best_result"))
    why = f"{len(ranked)} results ranked by {metric}"
    if len(ranked) > 1:
        runner_up = ranked[1]
        comparison = _comparison(data.get("paired_tests") or {}, result_name(best), result_name(runner_up))
        if comparison is not None:
            alpha = data["paired_tests"].get("alpha", 0.05)
            significant = comparison["p_value"] < alpha
            why += (f"; vs the runner-up {result_name(runner_up)}: p = {comparison['p_value']:.3g} "
                    f"({'significant' if significant else 'not significant'} at {alpha})")
            tiles.append(page.tile("vs runner-up", f"p = {comparison['p_value']:.3g}", key="runner_up_p",
                                   sub="significant" if significant else "not significant"))
    if failed:
        why += f"; failed or infeasible: {', '.join(failed)}"
    tone = "warn" if failed else "good"
    return page.verdict(tone, f"Best: {result_name(best)} — {metric} {page.percent(entry['value'])}", why, tiles)


def _comparison(tests: dict, a: str, b: str) -> dict | None:
    for comparison in tests.get("comparisons", []):
        if {comparison["a"], comparison["b"]} == {a, b}:
            return comparison
    return None


def _forest(ranked: list[dict], metric: str, best: dict | None) -> str:
    rows = [(result_name(result), result["metrics"][metric]["value"], result["metrics"][metric].get("ci_low"),
             result["metrics"][metric].get("ci_high")) for result in ranked if metric in result.get("metrics", {})]
    return charts.intervals(rows, axis=charts.Axis(metric, lambda value: f"{value * 100:.0f} %"),
                            best=result_name(best) if best else None, label=f"{metric} per result",
                            caption="dot: the value on the test set; bar: its 95 % confidence interval")


def _results_table(ranked: list[dict], best: dict | None) -> str:
    names = []
    for result in ranked:
        for name in result.get("metrics", {}):
            if name not in names:
                names.append(name)
    rows = [[result["arm"], result["classifier"]] + [page.Cell(page.escape(_interval(result["metrics"].get(name))),
                                                               sort=(result["metrics"].get(name) or {}).get("value", -1), numeric=True)
                                                     for name in names] for result in ranked]
    classes = ["best" if result is best else "" for result in ranked]
    return page.table(["arm", "classifier"] + names, rows, row_classes=classes, table_id="results")


def _paired_matrix(tests: dict, names: list[str]) -> str:
    alpha = tests.get("alpha", 0.05)
    matrix: list[list[float | None]] = [[None] * len(names) for _ in names]
    index = {name: position for position, name in enumerate(names)}
    for comparison in tests["comparisons"]:
        if comparison["a"] in index and comparison["b"] in index:
            a, b = index[comparison["a"]], index[comparison["b"]]
            matrix[a][b] = matrix[b][a] = comparison["p_value"]
    short = [str(position + 1) for position in range(len(names))]
    chart = charts.heatmap(matrix, [f"{number}. {name}" for number, name in zip(short, names)], short,
                           format_value=lambda value: f"{value:.3f}" if value >= 0.001 else "<.001",
                           highlight=lambda value: value < alpha, label="paired-test p-values")
    rows = [[comparison["a"], comparison["b"],
             page.Cell(f"{comparison['difference'] * 100:+.1f} pts" if comparison.get("difference") is not None else "-",
                       sort=comparison.get("difference") or 0, numeric=True),
             page.Cell(f"{comparison['p_value']:.3g}", sort=comparison["p_value"], numeric=True),
             page.Cell(page.badge("good", "significant") if comparison["p_value"] < alpha else page.badge("info", "no"),
                       sort=int(comparison["p_value"] < alpha))]
            for comparison in tests["comparisons"]]
    what = f"{tests.get('test', 'paired test')} on {tests.get('metric', 'the metric')}, alpha {alpha}"
    if tests.get("correction"):
        what += f", {tests['correction']} correction"
    return (chart + f"<p class=\"note\">p-values of {page.escape(what)}; green: below alpha. Columns are numbered as the rows.</p>"
            + "<details><summary>every comparison</summary>"
            + page.table(["a", "b", "a − b", "p", "significant"], rows, table_id="comparisons") + "</details>")


def _stages(stages: list[dict]) -> str:
    rows, classes = [], []
    for stage in stages:
        verdict = stage.get("verdict")
        rows.append([stage["name"], stage.get("kind") or "-",
                     page.Cell(page.badge(STATUS_TONES.get(stage.get("status"), "info"), stage.get("status") or "-"), sort=stage.get("status")),
                     page.Cell(page.badge(VERDICT_TONES.get(verdict, "info"), verdict) if verdict else "-", sort=verdict or ""),
                     page.Cell(format_bytes(stage.get("peak_bytes")), sort=stage.get("peak_bytes") or 0, numeric=True),
                     page.Cell(format_bytes(stage.get("budget_bytes")), sort=stage.get("budget_bytes") or 0, numeric=True),
                     page.Cell(format_seconds(stage.get("seconds")), sort=stage.get("seconds") or 0, numeric=True),
                     stage.get("note") or ""])
        classes.append("flagged" if stage.get("status") == "failed" or verdict == "does not fit" else "")
    return page.table(["stage", "kind", "status", "memory", "peak", "usable", "time", "note"], rows, row_classes=classes, table_id="stage-table")


def _confusion(result: dict) -> str:
    labels = [str(label) for label in result.get("labels") or range(len(result["confusion_matrix"]))]
    return charts.heatmap(result["confusion_matrix"], labels, labels, format_value=lambda value: f"{value:g}",
                          label=f"confusion matrix of {result_name(result)}", row_title="true", column_title="predicted")
