"""Statistics of a study: per-arm metrics with bootstrap intervals, and paired tests between arms.

Every function takes plain arrays and is checked against scipy / scikit-learn in the tests.

* :func:`classification_metrics`: accuracy, balanced accuracy, macro-F1, per-class precision and
  recall, one-vs-rest ROC-AUC (macro), confusion matrix.
* :func:`bootstrap_interval`: percentile bootstrap over samples for any of those metrics;
  :func:`group_bootstrap_interval`: the same over subjects (every sample of a drawn subject comes
  along), for accuracies and paired accuracy differences when a subject has several samples.
* Paired over the shared folds: :func:`wilcoxon_signed_rank` (with the rank-biserial
  correlation), :func:`corrected_resampled_t_test` (Nadeau & Bengio, 2003: the variance of
  cross-validated differences is inflated by ``n_test / n_train`` because training sets overlap).
* Paired over samples: :func:`mcnemar` (exact binomial below 25 discordant pairs, else chi-squared
  with continuity correction).
* More than two arms: :func:`friedman` (average ranks, scipy's statistic), then
  :func:`holm` adjusted pairwise p-values or the Nemenyi critical difference
  (:func:`nemenyi_critical_difference`, Demšar, 2006).
* Effect sizes: :func:`paired_cohens_d` on fold differences; the pooled accuracy difference with
  a subject-level bootstrap interval.
"""

from __future__ import annotations

import math

import numpy as np


def roc_auc_ovr(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Macro one-vs-rest ROC-AUC: the mean over classes of the AUC of ``scores[:, k]`` for class k.

    Equal to ``sklearn.metrics.roc_auc_score(..., multi_class="ovr")`` for probabilities; unlike it,
    it also takes decision values and negative residuals (only each column's order matters).
    None when a class is absent from ``labels``.
    """
    from sklearn.metrics import roc_auc_score

    classes = scores.shape[1]
    if len(np.unique(labels)) < classes:
        return None
    return float(np.mean([roc_auc_score(labels == k, scores[:, k]) for k in range(classes)]))


def classification_metrics(
    labels: np.ndarray, predictions: np.ndarray, scores: np.ndarray | None, num_classes: int
) -> dict:
    """The per-arm metrics of the module doc, as JSON-ready numbers and lists."""
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    classes = list(range(num_classes))
    precision, recall, _, support = precision_recall_fscore_support(
        labels, predictions, labels=classes, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, labels=classes, average="macro", zero_division=0)),
        "roc_auc_ovr": roc_auc_ovr(labels, scores) if scores is not None else None,
        "per_class": {
            "precision": [float(value) for value in precision],
            "recall": [float(value) for value in recall],
            "support": [int(value) for value in support],
        },
        "confusion": confusion_matrix(labels, predictions, labels=classes).tolist(),
    }


def bootstrap_interval(
    labels: np.ndarray,
    predictions: np.ndarray,
    metric=None,
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric(labels, predictions)`` over samples.

    ``metric`` defaults to accuracy, computed for all resamples at once; any other
    ``metric(labels, predictions) -> float`` (scikit-learn's) is called once per resample.
    """
    generator = np.random.default_rng(seed)
    count = len(labels)
    chosen = generator.integers(0, count, (resamples, count))
    if metric is None:
        values = (labels[chosen] == predictions[chosen]).mean(axis=1)
    else:
        values = np.array([metric(labels[rows], predictions[rows]) for rows in chosen])
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def group_bootstrap_interval(
    values: np.ndarray, groups: np.ndarray, *, resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(values)`` resampling whole groups (subjects) with replacement.

    ``values`` is one number per sample (1/0 for right/wrong gives accuracy; the difference of two
    arms' right/wrong gives the paired accuracy difference). A resample draws as many groups as
    there are, each bringing all its samples, so the interval reflects the variation between
    subjects rather than between the correlated slices of one subject. With one sample per group
    it is the ordinary bootstrap over samples.
    """
    values = np.asarray(values, dtype=float)
    _, group_index = np.unique(np.asarray(groups), return_inverse=True)
    count = group_index.max() + 1
    sums = np.bincount(group_index, weights=values, minlength=count)
    sizes = np.bincount(group_index, minlength=count).astype(float)
    generator = np.random.default_rng(seed)
    drawn = np.stack([np.bincount(row, minlength=count) for row in generator.integers(0, count, (resamples, count))])
    estimates = (drawn @ sums) / (drawn @ sizes)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(estimates, [tail, 100 - tail])
    return float(low), float(high)


def wilcoxon_signed_rank(first: np.ndarray, second: np.ndarray) -> dict:
    """Wilcoxon signed-rank test of paired scores (scipy; two-sided) and its rank-biserial correlation.

    Zero differences are dropped (Wilcoxon's method); all-equal pairs give p = 1. The p-value is
    exact for up to 50 pairs without ties, else from the normal approximation (tied fold
    accuracies are common; scipy's default would then run a permutation test, seconds per pair). The
    rank-biserial correlation is ``(R+ - R-) / (R+ + R-)`` over the ranks of the non-zero
    differences: +1 when ``first`` wins every pair.
    """
    from scipy.stats import rankdata, wilcoxon

    differences = np.asarray(first, dtype=float) - np.asarray(second, dtype=float)
    nonzero = differences[differences != 0]
    if len(nonzero) == 0:
        return {"statistic": 0.0, "p_value": 1.0, "rank_biserial": 0.0}
    ranks = rankdata(np.abs(nonzero))
    method = "exact" if len(nonzero) <= 50 and len(np.unique(ranks)) == len(ranks) else "approx"
    result = wilcoxon(first, second, zero_method="wilcox", alternative="two-sided", method=method)
    positive, negative = ranks[nonzero > 0].sum(), ranks[nonzero < 0].sum()
    return {
        "statistic": float(result.statistic),
        "p_value": float(result.pvalue),
        "rank_biserial": float((positive - negative) / (positive + negative)),
        "method": method,
    }


def corrected_resampled_t_test(differences: np.ndarray, n_train: int, n_test: int) -> dict:
    """Nadeau & Bengio's corrected resampled t-test on per-fold score differences (two-sided).

    ``t = mean(d) / sqrt((1/J + n_test/n_train) * var(d))`` with ``J - 1`` degrees of freedom,
    ``var`` the sample variance (ddof 1). With ``n_test = 0`` it is the ordinary one-sample t-test.
    """
    from scipy.stats import t as student_t

    differences = np.asarray(differences, dtype=float)
    folds = len(differences)
    mean, variance = differences.mean(), differences.var(ddof=1)
    if variance == 0:
        return {
            "t": 0.0 if mean == 0 else math.copysign(math.inf, mean),
            "p_value": 1.0 if mean == 0 else 0.0,
            "df": folds - 1,
        }
    statistic = mean / math.sqrt((1 / folds + n_test / n_train) * variance)
    return {"t": float(statistic), "p_value": float(2 * student_t.sf(abs(statistic), folds - 1)), "df": folds - 1}


def mcnemar(labels: np.ndarray, first: np.ndarray, second: np.ndarray) -> dict:
    """McNemar's test on paired predictions of the same samples.

    ``b``: first right, second wrong; ``c``: the reverse. Exact two-sided binomial test when
    ``b + c < 25``, else chi-squared with continuity correction ``(|b - c| - 1)^2 / (b + c)``.
    """
    from scipy.stats import binomtest, chi2

    first_right, second_right = first == labels, second == labels
    b = int(np.sum(first_right & ~second_right))
    c = int(np.sum(~first_right & second_right))
    if b + c == 0:
        return {"b": b, "c": c, "p_value": 1.0, "method": "none discordant"}
    if b + c < 25:
        return {"b": b, "c": c, "p_value": float(binomtest(b, b + c, 0.5).pvalue), "method": "exact"}
    statistic = (abs(b - c) - 1) ** 2 / (b + c)
    return {"b": b, "c": c, "statistic": float(statistic), "p_value": float(chi2.sf(statistic, 1)), "method": "chi2"}


def average_ranks(scores: np.ndarray) -> np.ndarray:
    """Mean rank of each column over rows (blocks), rank 1 = highest score, ties averaged."""
    from scipy.stats import rankdata

    return np.mean([rankdata(-row) for row in np.asarray(scores, dtype=float)], axis=0)


def friedman(scores: np.ndarray) -> dict:
    """Friedman's test over a ``blocks x arms`` score matrix (scipy), with the arms' average ranks."""
    from scipy.stats import friedmanchisquare

    scores = np.asarray(scores, dtype=float)
    if np.all(scores == scores[:, :1]):
        return {"statistic": 0.0, "p_value": 1.0, "average_ranks": average_ranks(scores).tolist()}
    result = friedmanchisquare(*scores.T)
    return {
        "statistic": float(result.statistic),
        "p_value": float(result.pvalue),
        "average_ranks": average_ranks(scores).tolist(),
    }


def nemenyi_critical_difference(arms: int, blocks: int, alpha: float = 0.05) -> float:
    """Demšar's critical difference of average ranks: ``q_alpha * sqrt(k (k + 1) / (6 N))``,
    ``q_alpha`` the studentized range quantile over ``sqrt(2)``."""
    from scipy.stats import studentized_range

    q_alpha = studentized_range.ppf(1 - alpha, arms, np.inf) / math.sqrt(2)
    return float(q_alpha * math.sqrt(arms * (arms + 1) / (6 * blocks)))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order."""
    count = len(p_values)
    order = np.argsort(p_values)
    adjusted = np.empty(count)
    running = 0.0
    for position, index in enumerate(order):
        running = max(running, min(1.0, (count - position) * p_values[index]))
        adjusted[index] = running
    return adjusted.tolist()


def paired_cohens_d(differences: np.ndarray) -> float:
    """Cohen's d for paired samples: mean difference over the standard deviation of the differences."""
    differences = np.asarray(differences, dtype=float)
    spread = differences.std(ddof=1)
    if spread == 0:
        return 0.0 if differences.mean() == 0 else math.copysign(math.inf, differences.mean())
    return float(differences.mean() / spread)
