"""``tightfit run STUDY.yaml``: every stage in graph order, skipping what is up to date.

The recipe, top to bottom (:func:`run_study`)::

    config  = load_study(file)                       # graph checked; nothing written on error
    samples = load_samples(config.data)              # ids, labels, development/evaluation split
    keys    = cache keys in graph order              # settings + data + inputs' keys
    tracker = StudyTracker(...)                      # MLflow parent run
    for stage in graph order (or --only STAGE):
        manifest complete with the same key -> skip
        otherwise: (without --resume) clear the stage's folder; open a nested run;
                   estimate, run, measure; write the manifest
    write results.json and results.md from the evaluate stages and every manifest
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from tightfit._optional import require
from tightfit.errors import ConfigError
from tightfit.study.manifest import cache_key, fingerprint_path, package_versions, read_manifest, write_manifest
from tightfit.study.spec import StudyConfig, stage_settings, topological_order

STAGES_FOLDER = "stages"
CACHE_FOLDER = "cache"  # preprocessed medical samples, keyed by input files and transform settings


def stage_keys(config: StudyConfig) -> dict[str, str]:
    """The cache key of every stage (see :mod:`tightfit.study.manifest`)."""
    shared = {
        "data": config.data.model_dump(mode="json"),
        "cv": config.cv.model_dump(mode="json"),
        "seed": config.seed,
        "device": config.device,
    }
    if config.data.path:
        shared["data_fingerprint"] = fingerprint_path(config.data.path)
    keys: dict[str, str] = {}
    for name in topological_order(config):
        stage = config.stage(name)
        parts = {
            "stage": stage_settings(stage),
            "shared": shared,
            "inputs": {source: keys[source] for source in stage.source},
        }
        weights = getattr(stage, "weights", None)
        if weights:
            parts["weights"] = fingerprint_path(weights)
        keys[name] = cache_key(parts)
    return keys


# What a study writes at its folder's top level (besides stages/, its MLflow store and record)
WRITTEN_FILES = ("study.yaml", "results.md", "results.json", "report.html")


def check_study_folder(folder: Path, *, resume: bool) -> None:
    """Refuse a folder this study would damage: a study writes ``WRITTEN_FILES`` at the top of its
    folder, so one that holds such a file but no ``stages/`` is the user's, not a study's; and
    ``--resume`` needs a folder a study has run in.

    Raises:
        ConfigError: naming the folder and, for a foreign file, the file.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"study folder: {folder} is a file, not a folder")
    is_study = (folder / STAGES_FOLDER).is_dir()
    if resume and not is_study:
        raise ConfigError(f"--resume: {folder} is not a study folder (no {STAGES_FOLDER}/ in it); run without --resume")
    foreign = [name for name in WRITTEN_FILES if (folder / name).exists()] if not is_study else []
    if foreign:
        raise ConfigError(
            f"study folder: {folder / foreign[0]} is not from a study run here (no {STAGES_FOLDER}/ beside it) and "
            "would "
            "be overwritten; choose another folder with --folder or folder: in the study file"
        )


def run_study(config: StudyConfig, *, resume: bool = False, only: str | None = None, console: Any = None) -> dict:
    """Run a study (see the module doc).

    Args:
        config: from :func:`tightfit.study.spec.load_study`.
        resume: continue interrupted stages (trainer checkpoints, extraction shards) instead of
            starting them again.
        only: run just this stage; the stages it reads must be complete.
        console: a rich console for progress (default: stderr).

    Returns:
        ``results.json``'s content: per-stage timings and every evaluate stage's statistics.

    Raises:
        ConfigError: ``only`` names no stage, or a stage it needs has not run.
    """
    import torch
    from rich.console import Console

    from tightfit.hardware.detect import resolve_device
    from tightfit.study.data import load_samples
    from tightfit.study.report import write_results
    from tightfit.study.stages import RUNNERS, StageContext
    from tightfit.study.tracking import StudyTracker

    console = console or Console(stderr=True)
    order = topological_order(config)
    if only is not None and only not in order:
        raise ConfigError(f"--only: no stage named {only!r} (stages: {', '.join(order)})")
    folder = Path(config.folder)
    check_study_folder(folder, resume=resume)
    keys = stage_keys(config)
    stage_dirs = {name: folder / STAGES_FOLDER / name for name in order}
    if only is not None:
        for source in config.stage(only).source:
            manifest = read_manifest(stage_dirs[source])
            if not manifest or manifest.get("status") != "complete" or manifest.get("key") != keys[source]:
                raise ConfigError(
                    f"--only {only}: stage {only!r} reads {source!r}, which has not run with these settings"
                )
    if config.tracking.mlflow:  # a missing extra is reported before anything is written
        require("mlflow", extra="mlflow", purpose="tracking a study in MLflow (tracking.mlflow: true)")
    samples = load_samples(config.data, config.seed, cache_dir=folder / CACHE_FOLDER)
    if any(config.stage(name).kind == "classify" for name in order):  # before minutes of extraction
        from tightfit.study.classify import check_folds

        check_folds(samples.labels[samples.evaluation], config.cv.folds, samples.class_names)
    for name in order:  # a damaged or pickled weights file is refused now, not after the stages before it
        weights = getattr(config.stage(name), "weights", None)
        if weights is not None:
            from tightfit.study.backbone import read_state_dict

            read_state_dict(weights)
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    (folder / STAGES_FOLDER).mkdir(parents=True, exist_ok=True)  # first: it marks the folder as a study's
    (folder / "study.yaml").write_text(_resolved_yaml(config))
    profile = None
    if device.type != "cpu" and any(getattr(config.stage(name), "batch_size", None) == "auto" for name in order):
        from tightfit.hardware.profiles import resolve_target

        profile = resolve_target(device.type, config.memory)  # detected once: it takes seconds
    tracker = StudyTracker(
        folder,
        config.name,
        enabled=config.tracking.mlflow,
        uri=config.tracking.uri,
        experiment=config.tracking.experiment,
    )
    status = "FAILED"
    try:
        for name in order if only is None else [only]:
            stage = config.stage(name)
            stage_dir = stage_dirs[name]
            manifest = read_manifest(stage_dir)
            if manifest and manifest.get("status") == "complete" and manifest.get("key") == keys[name]:
                console.print(f"[dim]{name}: up to date (key {keys[name]}), skipped[/]")
                continue
            if not resume and stage_dir.exists():
                shutil.rmtree(stage_dir)
            stage_dir.mkdir(parents=True, exist_ok=True)
            console.print(f"[bold]{name}[/] ({stage.kind})")
            run_id = tracker.start_stage(name, stage.kind, stage_settings(stage))
            context = StageContext(
                config, samples, folder, device, tracker, run_id, resume, console, stage_dirs, profile
            )
            started_at = time.time()
            started = time.perf_counter()
            write_manifest(
                stage_dir,
                {"name": name, "kind": stage.kind, "key": keys[name], "status": "running", "started": started_at},
            )
            try:
                outcome = RUNNERS[stage.kind](context, stage, stage_dir)
            except BaseException:
                tracker.end_stage(run_id, "FAILED")
                raise
            seconds = time.perf_counter() - started
            manifest = {
                "name": name,
                "kind": stage.kind,
                "key": keys[name],
                "status": "complete",
                "inputs": {source: keys[source] for source in stage.source},
                "settings": stage_settings(stage),
                "versions": package_versions(),
                "device": str(device),
                "started": started_at,
                "finished": time.time(),
                "estimated_s": outcome.estimated_s,
                "measured_s": seconds,
                "metrics": outcome.metrics,
                "notes": outcome.notes,
            }
            write_manifest(stage_dir, manifest)
            estimate = f"estimated {outcome.estimated_s:.1f} s, " if outcome.estimated_s is not None else ""
            console.print(f"  {name}: {estimate}took {seconds:.1f} s; " + "; ".join(outcome.notes))
            tracker.log_metrics(
                run_id,
                {
                    **outcome.metrics,
                    "measured_s": seconds,
                    **({"estimated_s": outcome.estimated_s} if outcome.estimated_s is not None else {}),
                },
            )
            for artifact in (
                "manifest.json",
                "statistics.json",
                "classification.json",
                "accuracy_ci.png",
                "confusion_matrices.png",
                "run/summary.json",
            ):
                tracker.log_artifact(run_id, stage_dir / artifact)
            tracker.end_stage(run_id)
        results = write_results(config, folder, order, stage_dirs)
        if tracker.enabled:
            for name in ("results.json", "results.md"):
                tracker.log_artifact(tracker.parent_id, folder / name)
        status = "FINISHED"
        return results
    finally:
        tracker.close(status)


def _resolved_yaml(config: StudyConfig) -> str:
    import yaml

    return yaml.safe_dump(config.model_dump(mode="json", by_alias=True), sort_keys=False)
