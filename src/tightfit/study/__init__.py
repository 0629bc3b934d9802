"""Research studies: ``tightfit run STUDY.yaml`` (see ``docs/study.md``).

One module per idea: ``spec`` (the file and its graph), ``data`` (samples, development/evaluation
split, volumes), ``ssl`` (MIM and SimCLR objectives), ``backbone`` (features of a layer, weights),
``features`` (shards), ``classify`` (SVM, SRC, logistic regression, kNN, shared folds), ``stats``
(metrics and tests), ``evaluate`` (the statistics stage), ``stages`` (what each kind runs),
``manifest`` (cache keys), ``tracking`` (MLflow), ``plan`` (the study as a pipeline plan),
``runner`` (the recipe), ``report`` (results.json, results.md).

From Python:
    >>> from tightfit.study import load_study, run_study
    >>> results = run_study(load_study("examples/pipelines/digits-study.yaml"))
"""

import importlib

_EXPORTS = {"load_study": "tightfit.study.spec", "run_study": "tightfit.study.runner"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tightfit.study' has no attribute {name!r}")
