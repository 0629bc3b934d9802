"""Classifiers on the CPU, cross-validated over folds every arm shares.

* ``svm``: standardisation + RBF SVC, C and gamma chosen by an inner stratified cross-validation
  on each outer training fold (nested CV: the outer test fold never picks hyper-parameters).
* ``src``: sparse-representation classification (Wright et al., 2009, Algorithm 1): the
  training samples, standardised and scaled to unit length, are the dictionary; each test sample
  (unit length too) is coded sparsely over it (OMP with ``n_nonzero`` atoms, or the lasso at
  ``alpha``) and assigned to the class whose atoms alone reconstruct it with the smallest
  residual. Test samples are coded ``chunk_size`` at a time over ``n_jobs`` workers, so memory
  stays at ``chunk_size x n_train`` codes.
* ``logreg`` and ``knn``: standardisation + scikit-learn's logistic regression / k nearest neighbours.

The folds (:func:`shared_folds`) depend only on the labels, the subjects, the fold count, the
repeats and the seed, and never split a subject: every arm and classifier sees the same splits, so comparisons
between them are paired.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from tightfit.errors import ConfigError
from tightfit.study.spec import ClassifierConfig


def check_folds(labels: np.ndarray, folds: int, class_names: list[str]) -> None:
    """Refuse, before any stage runs, a fold count the smallest class cannot fill.

    Raises:
        ConfigError: some class has fewer samples than ``folds`` (a test fold would lack it).
    """
    counts = np.bincount(labels, minlength=len(class_names))
    smallest = int(np.argmin(counts))
    if counts[smallest] < folds:
        raise ConfigError(
            f"cv.folds: {folds} folds, but class {class_names[smallest]!r} has {counts[smallest]} evaluation samples; "
            + (
                f"lower cv.folds to at most {counts[smallest]}, or add samples of that class"
                if counts[smallest] >= 2
                else "a class needs at least 2; add samples (raise data.limit) or lower data.development_fraction"
            )
        )


def shared_folds(
    labels: np.ndarray, groups: np.ndarray, folds: int, repeats: int, seed: int
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """``(repeat, train_indices, test_indices)``: stratified k-fold grouped by subject, repeated with fixed seeds.

    ``StratifiedGroupKFold`` keeps every sample of a group (a subject's slices or images) in one
    fold, so no subject is both trained and tested on; with one sample per group it is a plain
    stratified k-fold. Repeat ``r`` shuffles with seed ``seed + r``.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    dummy = np.zeros(len(labels))
    result = []
    for repeat in range(repeats):
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed + repeat)
        result += [(repeat, train, test) for train, test in splitter.split(dummy, labels, groups)]
    return result


class SparseRepresentationClassifier(ClassifierMixin, BaseEstimator):
    """SRC (see the module doc). ``decision_function`` returns minus the class-wise residuals."""

    def __init__(
        self, solver: str = "omp", n_nonzero: int = 20, alpha: float = 0.01, chunk_size: int = 256, n_jobs: int = 1
    ):
        self.solver = solver
        self.n_nonzero = n_nonzero
        self.alpha = alpha
        self.chunk_size = chunk_size
        self.n_jobs = n_jobs

    def _unit(self, features: np.ndarray) -> np.ndarray:
        standard = self.scaler_.transform(features)
        return standard / np.maximum(np.linalg.norm(standard, axis=1, keepdims=True), 1e-12)

    def fit(self, features: np.ndarray, labels: np.ndarray) -> SparseRepresentationClassifier:
        from sklearn.preprocessing import StandardScaler

        self.scaler_ = StandardScaler().fit(features)
        self.dictionary_ = self._unit(features)
        self.classes_, self.atom_class_ = np.unique(labels, return_inverse=True)
        return self

    def decision_function(self, features: np.ndarray) -> np.ndarray:
        import warnings

        from sklearn.decomposition import sparse_encode
        from sklearn.exceptions import ConvergenceWarning

        samples = self._unit(features)
        atoms, dimension = self.dictionary_.shape
        residuals = np.empty((len(samples), len(self.classes_)))
        for start in range(0, len(samples), self.chunk_size):
            chunk = samples[start : start + self.chunk_size]
            # Near-duplicate training samples make OMP stop before n_nonzero atoms, and the lasso
            # may stop short of its tolerance on them; the code found is still the best over the
            # atoms chosen, which is all SRC's class-wise residuals need.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Orthogonal matching pursuit ended prematurely")
                warnings.filterwarnings("ignore", category=ConvergenceWarning)
                if self.solver == "omp":
                    codes = sparse_encode(
                        chunk,
                        self.dictionary_,
                        algorithm="omp",
                        n_nonzero_coefs=min(self.n_nonzero, dimension, atoms),
                        n_jobs=self.n_jobs,
                    )
                else:
                    codes = sparse_encode(
                        chunk,
                        self.dictionary_,
                        algorithm="lasso_cd",
                        alpha=self.alpha,
                        n_jobs=self.n_jobs,
                        max_iter=2000,
                    )
            for index in range(len(self.classes_)):
                mine = self.atom_class_ == index
                reconstruction = codes[:, mine] @ self.dictionary_[mine]
                residuals[start : start + len(chunk), index] = np.linalg.norm(chunk - reconstruction, axis=1)
        return -residuals

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(features), axis=1)]


class ConvergenceCount:
    """Counts scikit-learn's ``ConvergenceWarning`` inside a ``with`` block instead of printing each.

    A study fits hundreds of models (folds x grid x arms); the lasso and logistic regression stop
    at their iteration limit on some folds and warn each time, burying the output. The stage
    reports the count once (``note()``) and keeps the fits, as scikit-learn does.
    """

    def __init__(self):
        self.count = 0

    def __enter__(self):
        import warnings

        from sklearn.exceptions import ConvergenceWarning

        self._catcher = warnings.catch_warnings(record=True)
        self._records = self._catcher.__enter__()
        warnings.simplefilter("always", ConvergenceWarning)
        self._category = ConvergenceWarning
        return self

    def __exit__(self, *exc) -> None:
        others = [record for record in self._records if not issubclass(record.category, self._category)]
        self.count += len(self._records) - len(others)
        self._catcher.__exit__(*exc)
        import warnings

        for record in others:  # anything else is shown as it would have been
            warnings.warn_explicit(record.message, record.category, record.filename, record.lineno)

    def note(self) -> list[str]:
        if not self.count:
            return []
        return [f"{self.count} scikit-learn fits stopped at their iteration limit (ConvergenceWarning); kept as fitted"]


def make_classifier(config: ClassifierConfig, *, seed: int, n_jobs: int = 1):
    """A fresh scikit-learn estimator for one classifier config."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    if config.name == "svm":
        pipeline = make_pipeline(StandardScaler(), SVC(kernel="rbf"))
        grid = {"svc__C": config.C, "svc__gamma": config.gamma}
        # grouped like the outer folds: a subject's samples never pick C/gamma for each other
        inner = StratifiedGroupKFold(config.inner_folds, shuffle=True, random_state=seed)
        return GridSearchCV(pipeline, grid, cv=inner, n_jobs=n_jobs)
    if config.name == "src":
        return SparseRepresentationClassifier(config.solver, config.n_nonzero, config.alpha, config.chunk_size, n_jobs)
    if config.name == "logreg":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return make_pipeline(StandardScaler(), KNeighborsClassifier(config.neighbours))


def class_scores(estimator, features: np.ndarray, num_classes: int) -> np.ndarray:
    """``(samples, classes)`` scores whose column k ranks samples by how much they look like class k."""
    if hasattr(estimator, "decision_function"):
        scores = np.asarray(estimator.decision_function(features), dtype=np.float64)
    else:
        scores = np.asarray(estimator.predict_proba(features), dtype=np.float64)
    if scores.ndim == 1:  # binary decision values: positive means class 1
        scores = np.stack([-scores, scores], axis=1)
    if scores.shape[1] != num_classes:  # a training fold without some class
        full = np.full((len(features), num_classes), -np.inf if scores.min() < 0 else 0.0)
        full[:, estimator.classes_] = scores
        scores = full
    return scores


def fit_fold(
    config: ClassifierConfig,
    features: np.ndarray,
    labels: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    *,
    num_classes: int,
    seed: int,
    n_jobs: int,
    groups: np.ndarray | None = None,
) -> dict:
    """Fit on ``train``, predict ``test``: predictions, scores and (svm) the chosen hyper-parameters.

    ``groups`` (per sample) keeps the SVM's inner folds grouped by subject too; default: one group per sample.
    """
    estimator = make_classifier(config, seed=seed, n_jobs=n_jobs)
    if config.name == "svm":
        inner_groups = groups[train] if groups is not None else np.arange(len(train))
        estimator.fit(features[train], labels[train], groups=inner_groups)
    else:
        estimator.fit(features[train], labels[train])
    result = {
        "predictions": estimator.predict(features[test]).astype(np.int64),
        "scores": class_scores(estimator, features[test], num_classes).astype(np.float32),
    }
    if hasattr(estimator, "best_params_"):
        result["chosen"] = {key.split("__")[-1]: value for key, value in estimator.best_params_.items()}
    return result
