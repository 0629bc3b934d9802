"""The page of a study: did every stage run, which arm and classifier won, and is the win more
than chance.

Made from the ``results.json`` that ``tightfit run STUDY.yaml`` writes in the study folder
(version 1). The fields read::

    study, cv: {folds, repeats, seed}
    stages: [{name, kind, status ("complete" when done), estimated_s, measured_s, notes: [...]}]
    evaluations: {STAGE: {samples, confidence, folds, repeats, class_names,
        table: [{arm, classifier, accuracy, accuracy_ci: [low, high], balanced_accuracy, macro_f1,
                 roc_auc_ovr, fold_accuracy_mean, fold_accuracy_std}],
        comparisons: {CLASSIFIER: {pairs: [{first, second, accuracy_difference,
                                             corrected_t: {p_value}, wilcoxon: {p_value, p_holm},
                                             mcnemar: {p_value}, cohens_d}],
                                   friedman: {statistic, p_value, arms, average_ranks}}},
        confusion: {"ARM/CLASSIFIER": [[count, ...], ...]}}}   (rows: true class)

Accuracies are fractions. Pairs compare two arms under the same classifier over the same folds;
the page leads with the corrected resampled t-test (Nadeau and Bengio), the test made for
cross-validated accuracies, and lists the others.
"""

from __future__ import annotations

from tightfit.report import charts, page
from tightfit.units import format_seconds

STATUS_TONES = {"complete": "good", "running": "warn", "not run": "info"}


def result_name(row: dict) -> str:
    """How a result is named everywhere on the page: ``arm / classifier``."""
    return f"{row['arm']} / {row['classifier']}"


def render(data: dict, source: str = "") -> str:
    """The HTML page of a study's ``results.json``."""
    evaluations = data.get("evaluations") or {}
    sections = []
    for name, statistics in evaluations.items():
        sections += _evaluation(name, statistics, data.get("cv") or {}, titled=len(evaluations) > 1)
    if not evaluations:
        sections.append(page.section("Results", '<p class="note">No evaluate stage has run yet.</p>'))
    sections.append(
        page.section(
            "Stages",
            _stages(data["stages"]),
            section_id="stages",
            note="times estimated before each stage ran, and measured; "
            "`tightfit plan STUDY.yaml --html plan.html` plans their memory",
        )
    )
    return page.document(
        title=str(data.get("study") or "study"),
        kind="study",
        verdict_html=_verdict(data),
        sections=sections,
        source=source,
    )


def _ranked(statistics: dict) -> list[dict]:
    return sorted(statistics["table"], key=lambda row: row["accuracy"], reverse=True)


def _interval(row: dict) -> str:
    low, high = row["accuracy_ci"]
    return f"{row['accuracy'] * 100:.1f} % [{low * 100:.1f}, {high * 100:.1f}]"


def _pair(statistics: dict, classifier: str, first: str, second: str) -> dict | None:
    for pair in (statistics.get("comparisons") or {}).get(classifier, {}).get("pairs", []):
        if {pair["first"], pair["second"]} == {first, second}:
            return pair
    return None


def _verdict(data: dict) -> str:
    stages = data["stages"]
    unfinished = [stage["name"] for stage in stages if stage.get("status") != "complete"]
    tiles = [
        page.tile(
            "stages complete",
            f"{len(stages) - len(unfinished)} / {len(stages)}",
            key="stages",
            sub=f"not complete: {', '.join(unfinished)}" if unfinished else "every stage ran",
        )
    ]
    evaluations = data.get("evaluations") or {}
    if not evaluations:
        return page.verdict("warn", "No results yet", "no evaluate stage has run", tiles)
    statistics = next(iter(evaluations.values()))
    ranked = _ranked(statistics)
    best = ranked[0]
    level = f"{statistics['confidence']:.0%}"
    low, high = best["accuracy_ci"]
    tiles.insert(
        0,
        page.tile(
            "best accuracy",
            page.percent(best["accuracy"]),
            key="best_metric",
            sub=f"{level} CI {low * 100:.1f}-{high * 100:.1f} %",
        ),
    )
    tiles.insert(1, page.tile("best", result_name(best), key="best_result"))
    cv = data.get("cv") or {}
    tiles.append(
        page.tile(
            "evaluated on",
            f"{statistics['samples']} samples",
            key="samples",
            sub=f"{cv.get('folds', statistics.get('folds'))}-fold CV x {cv.get('repeats', statistics.get('repeats'))}",
        )
    )
    why = f"{len(ranked)} arm x classifier results ranked by accuracy"
    rivals = [row for row in ranked[1:] if row["classifier"] == best["classifier"]]
    if rivals:
        pair = _pair(statistics, best["classifier"], best["arm"], rivals[0]["arm"])
        if pair is not None:
            p_value = pair["corrected_t"]["p_value"]
            significant = p_value < 1 - statistics["confidence"]
            why += (
                f"; against the next arm with {best['classifier']} ({rivals[0]['arm']}): corrected t-test p = "
                f"{p_value:.3g}, "
                f"{'a real difference' if significant else 'not distinguishable from chance'} at "
                f"{1 - statistics['confidence']:.2g}"
            )
            tiles.append(
                page.tile(
                    "vs next arm",
                    f"p = {p_value:.3g}",
                    key="runner_up_p",
                    sub="significant" if significant else "not significant",
                )
            )
    if unfinished:
        why += f"; not complete: {', '.join(unfinished)}"
    return page.verdict(
        "warn" if unfinished else "good", f"Best: {result_name(best)} — accuracy {_interval(best)}", why, tiles
    )


def _evaluation(name: str, statistics: dict, cv: dict, titled: bool) -> list[str]:
    def title(text: str) -> str:  # "statistics: results" when a study has several evaluate stages
        return f"{name}: {text}" if titled else text[:1].upper() + text[1:]

    ranked = _ranked(statistics)
    level = f"{statistics['confidence']:.0%}"
    rows = [(result_name(row), row["accuracy"], *row["accuracy_ci"]) for row in ranked]
    axis = charts.Axis("accuracy", lambda value: f"{value * 100:.0f} %", exact=lambda value: f"{value * 100:.1f} %")
    forest = charts.intervals(
        rows,
        axis=axis,
        best=rows[0][0],
        label="accuracy per result",
        caption=f"dot: accuracy pooled over the out-of-fold predictions; bar: its {level} bootstrap interval",
    )
    sections = [
        page.section(
            title(f"accuracy with {level} confidence intervals"),
            forest,
            section_id="results-chart",
            note=f"{statistics['samples']} evaluation samples, {cv.get('folds', statistics.get('folds'))}-fold "
            "stratified "
            f"cross-validation x {cv.get('repeats', statistics.get('repeats'))}, the same folds for every arm",
        ),
        page.section(
            title("results"), _table(ranked), note=f"accuracy [{level} CI]; fold accuracy: mean ± sd over every fold"
        ),
    ]
    comparisons = statistics.get("comparisons") or {}
    if comparisons:
        alpha = 1 - statistics["confidence"]
        matrices = "".join(
            f"<div>{_paired_matrix(classifier, comparison, alpha)}</div>"
            for classifier, comparison in comparisons.items()
        )
        sections.append(
            page.section(
                title("paired tests between arms"),
                f'<div class="grid2">{matrices}</div>',
                '<p class="note">p-values of the corrected resampled t-test (Nadeau-Bengio) between arms under one '
                "classifier; "
                f"green: below {alpha:.2g}. Columns are numbered as the rows.</p>",
                f"<details><summary>every pair, every test</summary>{_pairs_table(comparisons, alpha)}</details>",
                section_id="paired",
            )
        )
    confusion = statistics.get("confusion") or {}
    if confusion:
        sections.append(
            page.section(
                title("confusion matrices"),
                _confusions(ranked, confusion, statistics.get("class_names")),
                note="rows: true class, columns: predicted class; best result first",
            )
        )
    return sections


def _table(ranked: list[dict]) -> str:
    rows = []
    for row in ranked:
        auc = row.get("roc_auc_ovr")
        rows.append(
            [
                row["arm"],
                row["classifier"],
                page.Cell(page.escape(_interval(row)), sort=row["accuracy"], numeric=True),
                page.Cell(f"{row['balanced_accuracy']:.3f}", sort=row["balanced_accuracy"], numeric=True),
                page.Cell(f"{row['macro_f1']:.3f}", sort=row["macro_f1"], numeric=True),
                page.Cell(f"{auc:.3f}" if auc is not None else "-", sort=auc or 0, numeric=True),
                page.Cell(
                    f"{row['fold_accuracy_mean']:.3f} ± {row['fold_accuracy_std']:.3f}",
                    sort=row["fold_accuracy_mean"],
                    numeric=True,
                ),
            ]
        )
    classes = ["best"] + [""] * (len(ranked) - 1)
    return page.table(
        ["arm", "classifier", "accuracy", "balanced acc.", "macro-F1", "ROC-AUC (OvR)", "fold accuracy"],
        rows,
        row_classes=classes,
        table_id="results",
    )


def _p(value: float | None) -> str:
    if value is None:
        return "-"
    return "<.001" if value < 0.001 else f"{value:.3f}"


def _paired_matrix(classifier: str, comparison: dict, alpha: float) -> str:
    pairs = comparison["pairs"]
    arms: list[str] = []
    for pair in pairs:
        for arm in (pair["first"], pair["second"]):
            if arm not in arms:
                arms.append(arm)
    index = {arm: position for position, arm in enumerate(arms)}
    matrix: list[list[float | None]] = [[None] * len(arms) for _ in arms]
    for pair in pairs:
        a, b = index[pair["first"]], index[pair["second"]]
        matrix[a][b] = matrix[b][a] = pair["corrected_t"]["p_value"]
    numbers = [str(position + 1) for position in range(len(arms))]
    chart = charts.heatmap(
        matrix,
        [f"{number}. {arm}" for number, arm in zip(numbers, arms)],
        numbers,
        format_value=lambda value: _p(value),
        highlight=lambda value: value < alpha,
        label=f"paired-test p-values, {classifier}",
    )
    friedman = comparison.get("friedman")
    friedman_html = ""
    if friedman:
        ranks = ", ".join(f"{arm} {rank:.2f}" for arm, rank in zip(friedman["arms"], friedman["average_ranks"]))
        friedman_html = (
            f'<p class="note">Friedman χ² = {friedman["statistic"]:.2f}, p = {_p(friedman["p_value"])}; '
            f"average ranks (1 = best): {page.escape(ranks)}.</p>"
        )
    return f"<b>{page.escape(classifier)}</b>{chart}{friedman_html}"


def _pairs_table(comparisons: dict, alpha: float) -> str:
    rows = [
        [
            classifier,
            pair["first"],
            pair["second"],
            page.Cell(f"{pair['accuracy_difference'] * 100:+.1f} pts", sort=pair["accuracy_difference"], numeric=True),
            page.Cell(_p(pair["corrected_t"]["p_value"]), sort=pair["corrected_t"]["p_value"], numeric=True),
            page.Cell(_p(pair["wilcoxon"].get("p_holm")), sort=pair["wilcoxon"].get("p_holm") or 1, numeric=True),
            page.Cell(_p(pair["mcnemar"]["p_value"]), sort=pair["mcnemar"]["p_value"], numeric=True),
            page.Cell(f"{pair['cohens_d']:.2f}", sort=pair["cohens_d"], numeric=True),
            page.Cell(
                page.badge("good", "yes") if pair["corrected_t"]["p_value"] < alpha else page.badge("info", "no"),
                sort=int(pair["corrected_t"]["p_value"] < alpha),
            ),
        ]
        for classifier, comparison in comparisons.items()
        for pair in comparison["pairs"]
    ]
    return page.table(
        [
            "classifier",
            "arm A",
            "arm B",
            "A − B (mean fold acc.)",
            "corrected t p",
            "Wilcoxon p (Holm)",
            "McNemar p",
            "Cohen's d",
            f"p < {alpha:.2g}",
        ],
        rows,
        table_id="pairs",
    )


def _confusions(ranked: list[dict], confusion: dict, class_names: list[str] | None) -> str:
    figures = []
    for row in ranked:
        matrix = confusion.get(f"{row['arm']}/{row['classifier']}")
        if matrix is None:
            continue
        labels = [str(name) for name in class_names] if class_names else [str(number) for number in range(len(matrix))]
        figures.append(
            f"<div><b>{page.escape(result_name(row))}</b>"
            + charts.heatmap(
                matrix,
                labels,
                labels,
                format_value=lambda value: f"{value:g}",
                label=f"confusion matrix of {result_name(row)}",
                row_title="true",
                column_title="predicted",
            )
            + "</div>"
        )
    shown, folded = figures[:4], figures[4:]
    html = f'<div class="grid2">{"".join(shown)}</div>'
    if folded:
        html += f'<details><summary>{len(folded)} more</summary><div class="grid2">{"".join(folded)}</div></details>'
    return html


def _stages(stages: list[dict]) -> str:
    rows, classes = [], []
    for stage in stages:
        status = stage.get("status") or "not run"
        rows.append(
            [
                stage["name"],
                stage.get("kind") or "-",
                page.Cell(page.badge(STATUS_TONES.get(status, "bad"), status), sort=status),
                page.Cell(format_seconds(stage.get("estimated_s")), sort=stage.get("estimated_s") or 0, numeric=True),
                page.Cell(format_seconds(stage.get("measured_s")), sort=stage.get("measured_s") or 0, numeric=True),
                "; ".join(stage.get("notes") or []),
            ]
        )
        classes.append("" if status == "complete" else "flagged")
    return page.table(
        ["stage", "kind", "status", "estimated", "measured", "notes"], rows, row_classes=classes, table_id="stage-table"
    )
