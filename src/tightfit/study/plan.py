"""A study as a pipeline plan (``tightfit plan STUDY.yaml`` and ``tightfit run --dry-run``).

Each model stage becomes a plan row against the study's ``plan_device`` (default: its ``device``):

* ``pretrain`` / ``train``: a training step of the backbone at the stage's batch size
  (``contrastive`` at twice the batch: two views of every image go through the encoder; ``mim``
  planned as the full image, an upper bound, since MAE's encoder sees only the visible patches);
* ``extract``: forward-only (``tightfit.plan.inference``), the largest batch that fits when
  ``batch_size: auto``;
* ``sparse-code``, ``classify``, ``evaluate``: CPU stages, against the host's RAM.

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

    total = count_samples(config.data)
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
            if stage.kind == "extract" and stage.slices is not None:
                sides = shape.split("x")
                shape = "x".join(side for axis, side in enumerate(sides) if axis != stage.slices.axis + 1)
                note = (note + "; " if note else "") + f"batch counted in slices, {sides[stage.slices.axis + 1]} per volume"
            precision = None if stage.precision == "auto" else stage.precision
            if stage.kind == "extract":
                widths[name] = _feature_width(stage, spec, kwargs, shape, config.input)
                batch = None if stage.batch_size == "auto" else stage.batch_size
                stages.append(StageConfig(name=name, kind="extract", model=spec, input=shape, batch_size=batch,
                                          precision=precision, samples=evaluation, model_kwargs=kwargs,
                                          note=note or "frozen backbone"))
                continue
            batch = stage.batch_size * (2 if getattr(stage, "objective", None) == "contrastive" else 1)
            if getattr(stage, "objective", None):
                note = note or {"mim": "MIM, planned on full images (an upper bound)",
                                "contrastive": "contrastive: two views per image, planned at 2x batch; "
                                               "its negatives are the other 2(B-1) views, so B shapes the objective"}[stage.objective]
            checkpointing = stage.trainer.get("checkpointing")
            stages.append(StageConfig(name=name, kind="train", model=spec, input=shape, batch_size=batch,
                                      precision=precision, samples=development, model_kwargs=kwargs, note=note,
                                      checkpointing=bool(checkpointing) if checkpointing is not None else None))
        else:
            sources = [widths.get(source) for source in stage.source]
            features = max(sources) if sources and all(sources) and stage.kind != "evaluate" else None
            what = {"classify": "classifiers on the widest arm's features", "sparse-code": "dictionary learning",
                    "evaluate": "statistics"}[stage.kind]
            stages.append(StageConfig(name=name, kind="cpu", samples=evaluation, features=features,
                                      note=note or f"{what}, on the CPU"))
    return PipelineConfig(name=config.name, device=config.plan_device or _profile_name(config.device),
                          memory=config.memory, margin=config.margin, stages=stages)


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
