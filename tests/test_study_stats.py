"""The study's statistics and classifiers, checked against scipy and scikit-learn on fixed inputs."""

import numpy as np
import pytest
from scipy import stats as scipy_stats
from sklearn import metrics

from tightfit.study import stats
from tightfit.study.classify import SparseRepresentationClassifier, shared_folds

RNG = np.random.default_rng(0)
LABELS = RNG.integers(0, 3, 200)
PREDICTIONS = np.where(RNG.random(200) < 0.8, LABELS, RNG.integers(0, 3, 200))
PROBABILITIES = RNG.dirichlet(np.ones(3), 200)
FOLD_A = np.array([0.91, 0.88, 0.93, 0.90, 0.87, 0.92, 0.89, 0.94, 0.90, 0.91])
FOLD_B = np.array([0.89, 0.87, 0.90, 0.91, 0.85, 0.90, 0.86, 0.92, 0.88, 0.90])


def test_classification_metrics_match_sklearn():
    result = stats.classification_metrics(LABELS, PREDICTIONS, PROBABILITIES, 3)
    assert result["accuracy"] == pytest.approx(metrics.accuracy_score(LABELS, PREDICTIONS))
    assert result["balanced_accuracy"] == pytest.approx(metrics.balanced_accuracy_score(LABELS, PREDICTIONS))
    assert result["macro_f1"] == pytest.approx(metrics.f1_score(LABELS, PREDICTIONS, average="macro"))
    assert result["per_class"]["recall"] == pytest.approx(list(metrics.recall_score(LABELS, PREDICTIONS, average=None)))
    assert result["per_class"]["precision"] == pytest.approx(
        list(metrics.precision_score(LABELS, PREDICTIONS, average=None))
    )
    assert result["confusion"] == metrics.confusion_matrix(LABELS, PREDICTIONS).tolist()
    assert result["roc_auc_ovr"] == pytest.approx(metrics.roc_auc_score(LABELS, PROBABILITIES, multi_class="ovr"))


def test_bootstrap_interval_agrees_with_scipy_percentile_bootstrap():
    low, high = stats.bootstrap_interval(LABELS, PREDICTIONS, resamples=2000, seed=1)
    correct = (LABELS == PREDICTIONS).astype(float)
    reference = scipy_stats.bootstrap(
        (correct,), np.mean, n_resamples=2000, method="percentile", random_state=np.random.default_rng(1)
    ).confidence_interval
    assert low < correct.mean() < high
    assert low == pytest.approx(reference.low, abs=0.012)
    assert high == pytest.approx(reference.high, abs=0.012)
    # a custom metric goes through the per-resample path and gives the same interval for accuracy
    assert stats.bootstrap_interval(
        LABELS, PREDICTIONS, metrics.accuracy_score, resamples=2000, seed=1
    ) == pytest.approx((low, high))


def test_wilcoxon_is_scipys_and_rank_biserial_is_signed():
    result = stats.wilcoxon_signed_rank(FOLD_A, FOLD_B)
    reference = scipy_stats.wilcoxon(FOLD_A, FOLD_B, method=result["method"])
    assert result["method"] == "approx"  # FOLD_A - FOLD_B has tied differences
    assert result["p_value"] == pytest.approx(reference.pvalue)
    untied = stats.wilcoxon_signed_rank(
        FOLD_A, FOLD_A - np.linspace(0.01, 0.001, 10) * [1, -1, 1, 1, 1, 1, -1, 1, 1, 1]
    )
    assert untied["method"] == "exact"
    assert untied["p_value"] == pytest.approx(
        scipy_stats.wilcoxon(FOLD_A, FOLD_A - np.linspace(0.01, 0.001, 10) * [1, -1, 1, 1, 1, 1, -1, 1, 1, 1]).pvalue
    )
    assert result["statistic"] == pytest.approx(reference.statistic)
    differences = FOLD_A - FOLD_B
    ranks = scipy_stats.rankdata(np.abs(differences))
    expected = (ranks[differences > 0].sum() - ranks[differences < 0].sum()) / ranks.sum()
    assert result["rank_biserial"] == pytest.approx(expected)
    assert stats.wilcoxon_signed_rank(FOLD_A, FOLD_A)["p_value"] == 1.0


def test_corrected_t_test_reduces_to_scipys_t_test_and_is_more_conservative():
    differences = FOLD_A - FOLD_B
    plain = stats.corrected_resampled_t_test(differences, n_train=100, n_test=0)
    reference = scipy_stats.ttest_1samp(differences, 0.0)
    assert plain["t"] == pytest.approx(reference.statistic)
    assert plain["p_value"] == pytest.approx(reference.pvalue)
    corrected = stats.corrected_resampled_t_test(differences, n_train=80, n_test=20)
    factor = np.sqrt((1 / 10) / (1 / 10 + 20 / 80))
    assert corrected["t"] == pytest.approx(reference.statistic * factor)
    assert corrected["p_value"] > plain["p_value"]


def test_mcnemar_exact_and_chi_squared():
    labels = np.zeros(100, dtype=int)
    first = np.zeros(100, dtype=int)
    second = np.zeros(100, dtype=int)
    first[:3] = 1  # first wrong on 3
    second[10:20] = 1  # second wrong on 10
    exact = stats.mcnemar(labels, first, second)
    assert (exact["b"], exact["c"], exact["method"]) == (10, 3, "exact")
    assert exact["p_value"] == pytest.approx(scipy_stats.binomtest(10, 13, 0.5).pvalue)
    second[20:40] = 1
    large = stats.mcnemar(labels, first, second)
    assert large["method"] == "chi2"
    assert large["p_value"] == pytest.approx(scipy_stats.chi2.sf((abs(30 - 3) - 1) ** 2 / 33, 1))


def test_friedman_ranks_holm_and_nemenyi():
    scores = np.stack([FOLD_A, FOLD_B, FOLD_B - 0.02], axis=1)
    result = stats.friedman(scores)
    reference = scipy_stats.friedmanchisquare(*scores.T)
    assert result["p_value"] == pytest.approx(reference.pvalue)
    assert result["average_ranks"][0] < result["average_ranks"][1] < result["average_ranks"][2]
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    # Demšar (2006), table 5: q_0.05 for k = 3 is 2.343; CD = q * sqrt(k (k + 1) / (6 N))
    assert stats.nemenyi_critical_difference(3, 10) == pytest.approx(2.343 * np.sqrt(12 / 60), abs=2e-3)


def test_paired_cohens_d():
    differences = FOLD_A - FOLD_B
    assert stats.paired_cohens_d(differences) == pytest.approx(differences.mean() / differences.std(ddof=1))


def test_folds_are_stratified_and_shared():
    labels = np.repeat(np.arange(4), 25)
    groups = np.arange(100)
    first = shared_folds(labels, groups, 5, 2, seed=3)
    second = shared_folds(labels, groups, 5, 2, seed=3)
    assert len(first) == 10 and {repeat for repeat, _, _ in first} == {0, 1}
    for (_, train_a, test_a), (_, train_b, test_b) in zip(first, second):
        assert np.array_equal(test_a, test_b) and np.array_equal(train_a, train_b)
        assert np.bincount(labels[test_a]).tolist() == [5, 5, 5, 5]
    for repeat in (0, 1):
        covered = np.concatenate([test for r, _, test in first if r == repeat])
        assert sorted(covered.tolist()) == list(range(100))


@pytest.mark.parametrize("solver", ["omp", "lasso"])
def test_src_classifies_separable_classes_by_residual(solver):
    generator = np.random.default_rng(0)
    centres = generator.normal(size=(3, 20)) * 3
    labels = np.repeat(np.arange(3), 40)
    features = centres[labels] + generator.normal(size=(120, 20)) * 0.3
    model = SparseRepresentationClassifier(solver=solver, n_nonzero=5, alpha=0.01, chunk_size=7)
    model.fit(features[::2], labels[::2])
    scores = model.decision_function(features[1::2])
    assert scores.shape == (60, 3) and np.all(scores <= 0)  # minus residuals
    assert np.mean(model.predict(features[1::2]) == labels[1::2]) > 0.95
    # chunking does not change the answer
    whole = SparseRepresentationClassifier(solver=solver, n_nonzero=5, alpha=0.01, chunk_size=1000).fit(
        features[::2], labels[::2]
    )
    assert np.allclose(whole.decision_function(features[1::2]), scores, atol=1e-6)


def test_convergence_warnings_are_counted_once_not_printed_each():
    import warnings

    from sklearn.linear_model import Lasso

    from tightfit.study.classify import ConvergenceCount

    generator = np.random.default_rng(0)
    features, target = generator.normal(size=(50, 20)), generator.normal(size=50)
    counter = ConvergenceCount()
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        for _ in range(3):
            with counter:
                Lasso(alpha=1e-4, max_iter=1).fit(features, target)
                warnings.warn("something else", UserWarning, stacklevel=1)
    assert counter.count == 3
    assert [str(record.message) for record in shown] == ["something else"] * 3  # other warnings still show
    assert counter.note() == [
        "3 scikit-learn fits stopped at their iteration limit (ConvergenceWarning); kept as fitted"
    ]
