"""The digits study end to end: per-arm accuracy, stage times estimated vs measured, SRC vs SVM vs
logistic regression on the same features, and scikit-learn's SVC on the raw pixels as reference.

Runs ``examples/pipelines/digits-study.yaml`` (stages already complete in the folder are skipped,
so a second call only prints), then classifies the raw 64 pixels of the same evaluation samples
over the same folds: the reference every learnt arm is measured against (an RBF SVC on digits
pixels is known to reach about 98-99 %).

Run:
    .venv/bin/python benchmarks/study_digits.py [--folder studies/digits-study] [--json out.json]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPOSITORY = Path(__file__).resolve().parents[1]
STUDY = REPOSITORY / "examples" / "pipelines" / "digits-study.yaml"


def raw_pixel_reference(config) -> dict:
    """SVC (nested CV), SRC and logistic regression on the raw pixels, over the study's folds."""
    from sklearn.datasets import load_digits

    from tightfit.study.classify import fit_fold, shared_folds
    from tightfit.study.data import load_samples
    from tightfit.study.spec import ClassifierConfig

    samples = load_samples(config.data, config.seed)
    pixels = load_digits().data[samples.evaluation]
    labels = samples.labels[samples.evaluation]
    folds = shared_folds(labels, config.cv.folds, config.cv.repeats, config.cv.seed)
    rows = {}
    for classifier in (ClassifierConfig(name="svm"), ClassifierConfig(name="src"), ClassifierConfig(name="logreg")):
        started = time.perf_counter()
        accuracies = []
        for _, train, test in folds:
            fold = fit_fold(classifier, pixels, labels, train, test, num_classes=10, seed=config.cv.seed, n_jobs=1)
            accuracies.append(float(np.mean(fold["predictions"] == labels[test])))
        rows[classifier.name] = {
            "mean": float(np.mean(accuracies)),
            "std": float(np.std(accuracies, ddof=1)),
            "seconds": time.perf_counter() - started,
        }
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--folder", default="studies/digits-study", help="the study folder (default: studies/digits-study)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    from tightfit.study.runner import run_study
    from tightfit.study.spec import load_study

    config = load_study(STUDY)
    config.folder = args.folder
    started = time.perf_counter()
    results = run_study(config)
    wall = time.perf_counter() - started
    statistics = results["evaluations"]["statistics"]
    classifiers = sorted({row["classifier"] for row in statistics["table"]}, key=["svm", "src", "logreg", "knn"].index)
    by_arm: dict[str, dict[str, dict]] = {}
    for row in statistics["table"]:
        by_arm.setdefault(row["arm"], {})[row["classifier"]] = row

    print(
        f"fold accuracy (mean +- sd over {config.cv.folds} folds x {config.cv.repeats} repeats, "
        f"{statistics['samples']} evaluation samples, the same folds everywhere)"
    )
    print(f"{'arm':<22}" + "".join(f"{name:>18}" for name in classifiers))
    for arm, rows in by_arm.items():
        print(
            f"{arm:<22}"
            + "".join(
                f"{rows[name]['fold_accuracy_mean']:>11.3f} +- {rows[name]['fold_accuracy_std']:.3f}"
                for name in classifiers
            )
        )
    reference = raw_pixel_reference(config)
    print(
        f"{'raw pixels (reference)':<22}"
        + "".join(
            f"{reference[name]['mean']:>11.3f} +- {reference[name]['std']:.3f}" if name in reference else f"{'-':>18}"
            for name in classifiers
        )
    )

    print("\nstage times on this machine (estimated before the stage ran vs measured)")
    print(f"{'stage':<22}{'kind':<13}{'estimated':>11}{'measured':>11}")
    for stage in results["stages"]:
        estimated = f"{stage['estimated_s']:.1f} s" if stage["estimated_s"] is not None else "-"
        measured = f"{stage['measured_s']:.1f} s" if stage["measured_s"] is not None else "-"
        print(f"{stage['name']:<22}{stage['kind']:<13}{estimated:>11}{measured:>11}")
    print(f"\nthis call: {wall:.1f} s (completed stages are skipped); results in {args.folder}/results.md")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"table": statistics["table"], "raw_pixels": reference, "stages": results["stages"]}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
