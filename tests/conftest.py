"""Fixtures shared by more than one test module."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPORT_DATA = Path(__file__).parent / "data" / "report"
REPOSITORY = Path(__file__).resolve().parents[1]


def run_tightfit(*args: str, timeout: float = 300, cwd: str | Path | None = None, env: dict | None = None):
    """``python -m tightfit ARGS`` in a subprocess, its output captured as text (``from conftest import
    run_tightfit``). One intra-op thread (``OMP_NUM_THREADS=1``): tiny models on a shared 2-core
    machine run 10-20x slower with two competing threads. ``env`` adds to (or overrides) the environment."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "tightfit", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=environment,
    )


def pytest_collection_modifyitems(config, items):
    """Skip the tests marked ``gpu`` when no CUDA device is present, saying so (``-rs`` lists them)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: needs a CUDA device; torch.cuda.is_available() is False here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _private_tightfit_home(tmp_path_factory):
    """Keep the trust record of ``.pt2`` archives (``tightfit.trust``) out of the user's home: the
    tests' exports go to a record of their own, which subprocesses inherit through the variable."""
    previous = os.environ.get("TIGHTFIT_HOME")
    os.environ["TIGHTFIT_HOME"] = str(tmp_path_factory.mktemp("tightfit-home"))
    yield
    if previous is None:
        os.environ.pop("TIGHTFIT_HOME", None)
    else:
        os.environ["TIGHTFIT_HOME"] = previous


@pytest.fixture(scope="session")
def report_sources(tmp_path_factory) -> dict[str, Path]:
    """One source of every kind of report, made by the real producers where that is fast:

    ``run`` a digits training run folder (4 epochs on 400 samples: long enough to learn), ``plan`` the JSON of
    ``tightfit plan --json``, ``doctor`` that of ``tightfit doctor --json`` (no smoke test).
    From tests/data/report, because making them takes too long for a test: ``pipeline`` the
    output of ``tightfit plan examples/pipelines/seed002-rtx3050.yaml --json``, ``compression``
    a real ``report.json`` of ``tightfit compress`` on a digits run with the pruned model's
    accuracy lowered by 1.5 points so that one step is flagged, and ``study`` the
    ``results.json`` that ``tightfit run`` wrote for the tiny study of tests/test_study.py (three
    arms, three classifiers, digits), its per-class metrics left out.
    """
    from tightfit.hardware.doctor import run_doctor
    from tightfit.hardware.profiles import resolve_target
    from tightfit.plan.planner import plan
    from tightfit.report.callback import HtmlReport
    from tightfit.training.trainer import Trainer

    root = tmp_path_factory.mktemp("report-sources")
    run_dir = root / "run"
    Trainer(
        {
            "epochs": 4,
            "run_dir": str(run_dir),
            "data": {"limit": 400},
            "threads": 1,
            "logging": {"console": False, "tensorboard": False, "every_n_steps": 1},
        },
        callbacks=[HtmlReport()],
    ).fit()
    sources = {"run": run_dir}
    result = plan(
        "builtin:digits-cnn",
        "1x8x8",
        batch_size=32,
        precision="fp32",
        optimizer="adamw",
        profile=resolve_target("rtx3050-laptop-6gb", None),
    )
    sources["plan"] = root / "plan.json"
    sources["plan"].write_text(json.dumps(result.to_dict()))
    sources["pipeline"] = root / "pipeline.json"
    shutil.copy(REPORT_DATA / "pipeline_plan.json", sources["pipeline"])
    sources["doctor"] = root / "doctor.json"
    sources["doctor"].write_text(json.dumps(run_doctor(run_dir=root, smoke_test=False), default=str))
    (root / "compressed").mkdir()
    shutil.copy(REPORT_DATA / "compression_report.json", root / "compressed" / "report.json")
    sources["compression"] = root / "compressed"
    (root / "study").mkdir()
    shutil.copy(REPORT_DATA / "study_results.json", root / "study" / "results.json")
    sources["study"] = root / "study"
    return sources
