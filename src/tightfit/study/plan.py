"""A study as a pipeline plan (``tightfit plan STUDY.yaml`` and ``tightfit run --dry-run``).

Each model stage becomes a plan row against the study's ``plan_device`` (default: its ``device``):

* ``pretrain`` / ``train``: a training step of the backbone at the stage's batch size
  (``contrastive`` at twice the batch: two views of every image go through the encoder; ``mim``
  planned as the full image, an upper bound, since MAE's encoder sees only the visible patches);
* ``extract``: forward-only (``tightfit.plan.inference``), the largest batch that fits when
  ``batch_size: auto``;
* ``sparse-code``, ``classify``, ``evaluate``: CPU stages, their time and RAM estimated here from
  the number of samples and the feature width (:func:`cpu_stage_estimate`), judged against the
  target profile's host RAM.

Every stage gets a time: train stages epochs x epoch (steps x FLOPs / the profile's FLOP/s),
extract stages one pass over the evaluation samples (x slices), CPU stages the operation counts of
:func:`cpu_stage_estimate`; the plan's total is their sum. Sample counts come from the data when it
is at hand, else from ``data.samples``.

Input shapes come from the stage's ``input``, else the study's ``input``, else the data.
"""

from __future__ import annotations

from tightfit.errors import ConfigError
from tightfit.plan.pipeline import PipelineConfig, StageConfig
from tightfit.study.spec import VALIDATION_SHARE, StudyConfig, model_of, topological_order


def study_pipeline(config: StudyConfig) -> PipelineConfig:
    """The :class:`PipelineConfig` that plans ``config`` (see the module doc).

    Sample counts (for epoch times and the CPU stages' RAM) come from the data when it is at hand
    (:func:`tightfit.study.data.count_samples`: the digits, or the files of a volumes folder); a
    classify stage's feature width is the widest of its arms, read from each backbone on the meta
    device (or a sparse-code stage's ``n_components``).
    """
    from tightfit.study.data import count_samples

    total = count_samples(config.data) or config.data.samples
    if config.data.limit and total:
        total = min(total, config.data.limit)
    development = evaluation = None
    if total is not None:
        development = round(total * config.data.development_fraction)
        evaluation = total - development
        development = round(development * (1 - VALIDATION_SHARE)) or None
    widths: dict[str, int | None] = {}
    stages = []
    for name in topological_order(config):
        stage = config.stage(name)
        note = stage.note
        if stage.kind == "sparse-code":
            widths[name] = stage.n_components
        if stage.kind in ("pretrain", "train", "extract"):
            spec, kwargs = model_of(config, stage)
            shape = stage.input or config.input
            if shape is None:
                raise ConfigError(f"stage {name!r}: input: needed for the plan (or set the study's input)")
            extracted = evaluation
            if stage.kind == "extract" and stage.slices is not None:
                sides = shape.split("x")
                shape = "x".join(side for axis, side in enumerate(sides) if axis != stage.slices.axis + 1)
                per_volume = int(sides[stage.slices.axis + 1])
                if stage.slices.select == "central":
                    per_volume = min(per_volume, stage.slices.count)
                extracted = evaluation * per_volume if evaluation else None
                note = (note + "; " if note else "") + f"batch counted in slices, {per_volume} per volume"
            precision = None if stage.precision == "auto" else stage.precision
            if stage.kind == "extract":
                widths[name] = _feature_width(stage, spec, kwargs, shape, config.input)
                batch = None if stage.batch_size == "auto" else stage.batch_size
                stages.append(
                    StageConfig(
                        name=name,
                        kind="extract",
                        model=spec,
                        input=shape,
                        batch_size=batch,
                        precision=precision,
                        samples=extracted,
                        model_kwargs=kwargs,
                        note=note or "frozen backbone",
                    )
                )
                continue
            batch = stage.batch_size * (2 if getattr(stage, "objective", None) == "contrastive" else 1)
            if getattr(stage, "objective", None):
                note = (
                    note
                    or {
                        "mim": "MIM, planned on full images (an upper bound)",
                        "contrastive": "contrastive: two views per image, planned at 2x batch; "
                        "its negatives are the other 2(B-1) views, so B shapes the objective",
                    }[stage.objective]
                )
            checkpointing = stage.trainer.get("checkpointing")
            stages.append(
                StageConfig(
                    name=name,
                    kind="train",
                    model=spec,
                    input=shape,
                    batch_size=batch,
                    precision=precision,
                    samples=development,
                    model_kwargs=kwargs,
                    note=note,
                    checkpointing=bool(checkpointing) if checkpointing is not None else None,
                    epochs=stage.epochs,
                )
            )
        else:
            sources = [widths.get(source) for source in stage.source]
            features = max(sources) if sources and all(sources) and stage.kind != "evaluate" else None
            what = {
                "classify": "classifiers on the widest arm's features",
                "sparse-code": "dictionary learning",
                "evaluate": "statistics",
            }[stage.kind]
            seconds, ram = cpu_stage_estimate(config, stage, evaluation, features, len(stage.source))
            stages.append(
                StageConfig(
                    name=name,
                    kind="cpu",
                    samples=evaluation,
                    features=features,
                    cpu_seconds=seconds,
                    cpu_bytes=ram,
                    note=note or f"{what}, on the CPU",
                )
            )
    return PipelineConfig(
        name=config.name,
        device=config.plan_device or _profile_name(config.device),
        memory=config.memory,
        margin=config.margin,
        stages=stages,
    )


# Assumed sustained rates of a laptop CPU (the target hosts do not publish them): scikit-learn's BLAS-backed
# work (OMP, lasso, logistic regression, distances) at 20 GFLOP/s float64 over several cores; libsvm's SMO
# is single-threaded and cache-bound, 1 GFLOP/s of kernel evaluations. They set the order of magnitude.
CPU_BLAS_FLOPS = 20e9
CPU_SVM_FLOPS = 1e9
SVM_PASSES = 3  # kernel rows evaluated about this many times over n_train while SMO converges
LOGREG_ITERATIONS = 100
STATISTICS_FIXED_S = 5.0  # plots and files of an evaluate stage


def cpu_stage_estimate(
    config: StudyConfig, stage, samples: int | None, features: int | None, arms: int
) -> tuple[float | None, int | None]:
    """Seconds and bytes of RAM of a sparse-code, classify or evaluate stage, from operation counts.

    ``samples`` is the evaluation part, ``features`` the widest arm's width. Outer folds train on
    ``samples x (1 - 1/folds)`` and test on the rest, ``folds x repeats`` times per arm:

    * svm: ``C x gamma x inner_folds + 1`` fits per outer fold, each ``SVM_PASSES x n_train^2 x d x 2`` FLOPs;
    * src: ``n_test x n_nonzero x n_train x d x 2`` FLOPs per outer fold (OMP's correlations);
    * logreg: ``LOGREG_ITERATIONS x n_train x d x classes x 4``; knn: ``n_test x n_train x d x 2``;
    * sparse-code: ``max_iter x n x n_components x d x 20`` (the lasso codes of each pass);
    * evaluate: bootstrap resamples x samples x arms x classifiers, plus plots.

    RAM: three float64 copies of the feature matrix (input, standardised, fold slices), plus the
    SVM kernel cache or SRC's ``chunk_size x n_train`` codes.

    Returns:
        ``(seconds, bytes)``, each None when the samples or the width are unknown.
    """
    if not samples:
        return None, None
    folds = config.cv.folds * config.cv.repeats
    train = samples * (1 - 1 / config.cv.folds)
    test = samples - train
    if stage.kind == "evaluate":
        classify = config.stage(stage.source[0])
        rows = len(classify.source) * len(classify.classifiers)
        return STATISTICS_FIXED_S + stage.bootstrap * samples * rows * 4 / CPU_BLAS_FLOPS, samples * rows * 64
    if not features:
        return None, None
    matrix = samples * features * 8 * 3
    if stage.kind == "sparse-code":
        flops = stage.max_iter * samples * stage.n_components * features * 20
        return flops / CPU_BLAS_FLOPS, matrix + samples * stage.n_components * 8
    seconds, extra = 0.0, 0
    classes = 2
    for classifier in stage.classifiers:
        if classifier.name == "svm":
            fits = len(classifier.C) * len(classifier.gamma) * classifier.inner_folds + 1
            inner = train * (1 - 1 / classifier.inner_folds)
            seconds += fits * SVM_PASSES * inner**2 * features * 2 / CPU_SVM_FLOPS
            extra = max(extra, 200 * 2**20)  # libsvm's default kernel cache
        elif classifier.name == "src":
            seconds += test * classifier.n_nonzero * train * features * 2 / CPU_BLAS_FLOPS
            extra = max(extra, int(min(classifier.chunk_size, test) * train * 8))
        elif classifier.name == "logreg":
            seconds += LOGREG_ITERATIONS * train * features * classes * 4 / CPU_BLAS_FLOPS
        else:
            seconds += test * train * features * 2 / CPU_BLAS_FLOPS
    return seconds * folds * arms, matrix + extra


def _feature_width(stage, spec: str, kwargs: dict, shape: str, study_input: str | None) -> int | None:
    """The width of an extract stage's features: one forward of its backbone on the meta device."""
    import torch

    from tightfit.models.spec import build_model, parse_input_spec
    from tightfit.study.backbone import FeatureExtractor

    try:
        model = build_model(spec, meta=True, **kwargs).eval()
        extractor = FeatureExtractor(model, stage.layer, stage.pooling)
        sample = parse_input_spec(shape)[0].shape
        with torch.no_grad():
            width = extractor(torch.empty(1, *sample, device="meta")).shape[1]
    except Exception:  # noqa: BLE001 - the width only refines a RAM estimate; the plan goes on without it
        return None
    if stage.slices is not None and stage.slices.aggregate == "all" and study_input:
        width *= int(study_input.split("x")[stage.slices.axis + 1])
    return int(width)


def _profile_name(device: str) -> str | None:
    return None if device == "auto" else device
