"""The evaluate stage: metrics per arm x classifier, paired tests between arms, plots.

Pooled metrics use the first repeat's out-of-fold predictions (every sample predicted once, by a
model that never saw it); fold-level tests use every fold of every repeat. Arms are compared per
classifier, pair by pair, over the same folds and the same samples. Accuracy intervals and the
pooled accuracy difference's interval bootstrap over subjects (the classify stage's groups), and
every pair's Wilcoxon, corrected-t and McNemar p-values are Holm-adjusted over the pairs of their
classifier (``p_holm`` beside ``p_value``), whatever ``posthoc`` says.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

from tightfit.study import stats

STATISTICS_FILE = "statistics.json"


def evaluate_classification(
    classify_dir: Path,
    out_dir: Path,
    *,
    class_names: list[str],
    resamples: int = 1000,
    confidence: float = 0.95,
    posthoc: str = "holm",
    seed: int = 0,
) -> dict:
    """Compute the statistics of a classify stage's outputs; write ``statistics.json`` and plots to ``out_dir``."""
    summary = json.loads((classify_dir / "classification.json").read_text())
    arrays = np.load(classify_dir / "predictions.npz", allow_pickle=False)
    labels = np.asarray(summary["labels"])
    groups = np.asarray(summary.get("groups") or summary["ids"])
    arms, classifiers = summary["arms"], summary["classifiers"]
    train_size, test_size = np.mean(summary["fold_sizes"], axis=0)
    table, per_class, confusion = [], {}, {}
    for arm in arms:
        for classifier in classifiers:
            predictions = arrays[f"{arm}/{classifier}/predictions"][0]
            scores = arrays[f"{arm}/{classifier}/scores"][0]
            metrics = stats.classification_metrics(labels, predictions, scores, len(class_names))
            low, high = stats.group_bootstrap_interval(
                predictions == labels, groups, resamples=resamples, confidence=confidence, seed=seed
            )
            folds = summary["results"][arm][classifier]["fold_accuracy"]
            table.append(
                {
                    "arm": arm,
                    "classifier": classifier,
                    "accuracy": metrics["accuracy"],
                    "accuracy_ci": [low, high],
                    "balanced_accuracy": metrics["balanced_accuracy"],
                    "macro_f1": metrics["macro_f1"],
                    "roc_auc_ovr": metrics["roc_auc_ovr"],
                    "fold_accuracy_mean": float(np.mean(folds)),
                    "fold_accuracy_std": float(np.std(folds, ddof=1)) if len(folds) > 1 else 0.0,
                    "seconds": summary["results"][arm][classifier]["seconds"],
                }
            )
            per_class[f"{arm}/{classifier}"] = metrics["per_class"]
            confusion[f"{arm}/{classifier}"] = metrics["confusion"]
    comparisons = (
        {
            classifier: _compare_arms(
                summary,
                arrays,
                labels,
                groups,
                classifier,
                train_size,
                test_size,
                posthoc,
                resamples=resamples,
                confidence=confidence,
                seed=seed,
            )
            for classifier in classifiers
        }
        if len(arms) > 1
        else {}
    )
    statistics = {
        "confidence": confidence,
        "bootstrap_resamples": resamples,
        "posthoc": posthoc,
        "samples": len(labels),
        "subjects": len(np.unique(groups)),
        "class_names": class_names,
        "folds": summary["folds"],
        "repeats": summary["repeats"],
        "mean_fold_sizes": {"train": float(train_size), "test": float(test_size)},
        "table": table,
        "per_class": per_class,
        "confusion": confusion,
        "comparisons": comparisons,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    statistics["plots"] = _plots(statistics, out_dir)
    (out_dir / STATISTICS_FILE).write_text(json.dumps(statistics, indent=1))
    return statistics


def _compare_arms(
    summary,
    arrays,
    labels,
    groups,
    classifier,
    train_size,
    test_size,
    posthoc,
    *,
    resamples: int,
    confidence: float,
    seed: int,
) -> dict:
    arms = summary["arms"]
    folds = {arm: np.asarray(summary["results"][arm][classifier]["fold_accuracy"]) for arm in arms}
    pairs = []
    for first, second in itertools.combinations(arms, 2):
        differences = folds[first] - folds[second]
        right_first = arrays[f"{first}/{classifier}/predictions"][0] == labels
        right_second = arrays[f"{second}/{classifier}/predictions"][0] == labels
        pooled = right_first.astype(float) - right_second
        wilcoxon = stats.wilcoxon_signed_rank(folds[first], folds[second])
        pairs.append(
            {
                "first": first,
                "second": second,
                "accuracy_difference": float(differences.mean()),
                "wilcoxon": wilcoxon,
                "corrected_t": stats.corrected_resampled_t_test(differences, int(train_size), int(test_size)),
                "mcnemar": stats.mcnemar(
                    labels,
                    arrays[f"{first}/{classifier}/predictions"][0],
                    arrays[f"{second}/{classifier}/predictions"][0],
                ),
                "cohens_d": stats.paired_cohens_d(differences),
                "pooled_accuracy_difference": float(pooled.mean()),
                "pooled_accuracy_difference_ci": list(
                    stats.group_bootstrap_interval(
                        pooled, groups, resamples=resamples, confidence=confidence, seed=seed
                    )
                ),
                "rank_biserial": wilcoxon["rank_biserial"],
            }
        )
    result = {"pairs": pairs}
    for test in ("wilcoxon", "corrected_t", "mcnemar"):
        for pair, value in zip(pairs, stats.holm([pair[test]["p_value"] for pair in pairs])):
            pair[test]["p_holm"] = value
    if len(arms) > 2:
        matrix = np.stack([folds[arm] for arm in arms], axis=1)
        friedman = stats.friedman(matrix)
        result["friedman"] = {**friedman, "arms": arms}
        if posthoc == "nemenyi":
            difference = stats.nemenyi_critical_difference(len(arms), len(matrix))
            ranks = dict(zip(arms, friedman["average_ranks"]))
            result["nemenyi_critical_difference"] = difference
            for pair in pairs:
                pair["nemenyi_significant"] = bool(abs(ranks[pair["first"]] - ranks[pair["second"]]) > difference)
    return result


def _plots(statistics: dict, out_dir: Path) -> list[str]:
    """A ranked accuracy chart with confidence intervals and one confusion-matrix grid; returns file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(statistics["table"], key=lambda row: row["accuracy"])
    figure, axis = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
    positions = np.arange(len(rows))
    accuracy = np.array([row["accuracy"] for row in rows])
    intervals = np.array([row["accuracy_ci"] for row in rows])
    axis.errorbar(
        accuracy, positions, xerr=[accuracy - intervals[:, 0], intervals[:, 1] - accuracy], fmt="o", capsize=3
    )
    axis.set_yticks(positions, [f"{row['arm']} / {row['classifier']}" for row in rows])
    axis.set_xlabel(f"accuracy ({statistics['confidence']:.0%} bootstrap interval)")
    figure.tight_layout()
    figure.savefig(out_dir / "accuracy_ci.png", dpi=120)
    plt.close(figure)

    names = list(statistics["confusion"])
    columns = min(4, len(names))
    lines = (len(names) + columns - 1) // columns
    figure, axes = plt.subplots(lines, columns, figsize=(3.2 * columns, 3.2 * lines), squeeze=False)
    for axis, name in zip(axes.flat, names):
        axis.imshow(np.asarray(statistics["confusion"][name]), cmap="Blues")
        axis.set_title(name, fontsize=8)
        axis.set_xticks([])
        axis.set_yticks([])
    for axis in list(axes.flat)[len(names) :]:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(out_dir / "confusion_matrices.png", dpi=100)
    plt.close(figure)
    return ["accuracy_ci.png", "confusion_matrices.png"]
