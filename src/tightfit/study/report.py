"""``results.json`` and ``results.md``: what a study found, in the study folder.

``results.json`` is the input of any report (its schema is in ``docs/study.md``); ``results.md``
holds the tables a paper can take: every arm x classifier with its confidence interval, the paired
tests between arms, Friedman's test, and the time of every stage, estimated against measured.
"""

from __future__ import annotations

import json
from pathlib import Path

from tightfit.study.evaluate import STATISTICS_FILE
from tightfit.study.manifest import read_manifest
from tightfit.study.spec import StudyConfig
from tightfit.units import format_seconds

RESULTS_VERSION = 1


def write_results(config: StudyConfig, folder: Path, order: list[str], stage_dirs: dict[str, Path]) -> dict:
    """Gather every manifest and evaluate stage into ``results.json`` and ``results.md``; returns the JSON data."""
    stages = []
    for name in order:
        manifest = read_manifest(stage_dirs[name]) or {}
        stages.append(
            {
                "name": name,
                "kind": config.stage(name).kind,
                "status": manifest.get("status", "not run"),
                "estimated_s": manifest.get("estimated_s"),
                "measured_s": manifest.get("measured_s"),
                "notes": manifest.get("notes", []),
                "metrics": manifest.get("metrics", {}),
                "folder": str(stage_dirs[name].relative_to(folder)),
            }
        )
    evaluations = {}
    for name in order:
        path = stage_dirs[name] / STATISTICS_FILE
        if config.stage(name).kind == "evaluate" and path.is_file():
            evaluations[name] = json.loads(path.read_text())
            evaluations[name]["plots"] = [
                str((stage_dirs[name] / plot).relative_to(folder)) for plot in evaluations[name]["plots"]
            ]
    results = {
        "version": RESULTS_VERSION,
        "study": config.name,
        "data": config.data.model_dump(mode="json"),
        "cv": config.cv.model_dump(mode="json"),
        "seed": config.seed,
        "stages": stages,
        "evaluations": evaluations,
    }
    (folder / "results.json").write_text(json.dumps(results, indent=1))
    (folder / "results.md").write_text(render_markdown(results))
    return results


def _p(value: float | None) -> str:
    if value is None:
        return "-"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _raw_holm(test: dict) -> str:
    return f"{_p(test['p_value'])} / {_p(test.get('p_holm'))}"


def render_markdown(results: dict) -> str:
    """The results as Markdown tables."""
    lines = [f"# {results['study']}", ""]
    cv = results["cv"]
    for name, statistics in results["evaluations"].items():
        level = f"{statistics['confidence']:.0%}"
        subjects = statistics.get("subjects", statistics["samples"])
        lines += [
            (
                f"## {name}: {statistics['samples']} evaluation samples of {subjects} subjects, {cv['folds']}-fold "
                f"stratified CV x {cv['repeats']} (seed {cv['seed']}), the same folds for every arm"
            ),
            "",
            (
                "Cross-validation is grouped by subject (scikit-learn's StratifiedGroupKFold, the SVM's inner folds "
                "too): "
                "every sample of a subject sits in one fold, so no subject is both trained and tested on."
            ),
            "",
            (
                f"Accuracy is pooled over the out-of-fold predictions of the first repeat, with a {level} percentile "
                f"bootstrap interval over subjects ({statistics['bootstrap_resamples']} resamples); fold accuracy is "
                "the "
                "mean +- sd over every fold of every repeat."
            ),
            "",
            f"| arm | classifier | accuracy [{level} CI] | balanced acc. | macro-F1 | ROC-AUC (OvR) | fold acc. |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in statistics["table"]:
            low, high = row["accuracy_ci"]
            auc = f"{row['roc_auc_ovr']:.3f}" if row["roc_auc_ovr"] is not None else "-"
            lines.append(
                f"| {row['arm']} | {row['classifier']} | {row['accuracy']:.3f} [{low:.3f}, {high:.3f}] | "
                f"{row['balanced_accuracy']:.3f} | {row['macro_f1']:.3f} | {auc} | "
                f"{row['fold_accuracy_mean']:.3f} +- {row['fold_accuracy_std']:.3f} |"
            )
        lines.append("")
        for classifier, comparison in statistics["comparisons"].items():
            lines += [
                f"### Paired tests between arms, {classifier}",
                "",
                (
                    f"p-values raw / Holm-adjusted over the {len(comparison['pairs'])} pairs of this classifier; the "
                    "pooled "
                    f"difference's {level} interval bootstraps subjects."
                ),
                "",
                (
                    "| arm A | arm B | mean fold acc. A-B | pooled acc. A-B [CI] | Wilcoxon p | corrected t p "
                    "(Nadeau-Bengio) "
                    "| McNemar p (b/c) | Cohen's d | rank-biserial |"
                ),
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for pair in comparison["pairs"]:
                mcnemar = pair["mcnemar"]
                low, high = pair.get("pooled_accuracy_difference_ci", (None, None))
                pooled = (
                    f"{pair['pooled_accuracy_difference']:+.3f} [{low:+.3f}, {high:+.3f}]" if low is not None else "-"
                )
                lines.append(
                    f"| {pair['first']} | {pair['second']} | {pair['accuracy_difference']:+.4f} | {pooled} | "
                    f"{_raw_holm(pair['wilcoxon'])} | {_raw_holm(pair['corrected_t'])} | "
                    f"{_raw_holm(mcnemar)} ({mcnemar['b']}/{mcnemar['c']}) | "
                    f"{pair['cohens_d']:.2f} | {pair['rank_biserial']:.2f} |"
                )
            friedman = comparison.get("friedman")
            if friedman:
                ranks = ", ".join(f"{arm} {rank:.2f}" for arm, rank in zip(friedman["arms"], friedman["average_ranks"]))
                lines += [
                    "",
                    f"Friedman chi2 = {friedman['statistic']:.2f}, p = {_p(friedman['p_value'])}; "
                    f"average ranks (1 = best): {ranks}.",
                ]
                if "nemenyi_critical_difference" in comparison:
                    lines.append(f"Nemenyi critical difference: {comparison['nemenyi_critical_difference']:.2f}.")
            lines.append("")
        lines += [f"Plots: {', '.join(statistics['plots'])}", ""]
    lines += ["## Stage times", "", "| stage | kind | estimated | measured | notes |", "|---|---|---|---|---|"]
    for stage in results["stages"]:
        lines.append(
            f"| {stage['name']} | {stage['kind']} | {format_seconds(stage['estimated_s'])} | "
            f"{format_seconds(stage['measured_s'])} | {'; '.join(stage['notes'])} |"
        )
    lines += [
        "",
        "Estimates, made before each stage ran: pretrain/train from three training steps (the trainer's step) timed "
        "on this machine "
        "x the steps of all epochs; extract from three forward batches; classify from its first fold per classifier.",
        "",
    ]
    return "\n".join(lines)
