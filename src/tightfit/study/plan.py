"""A study as a pipeline plan (``tightfit plan STUDY.yaml`` and ``tightfit run --dry-run``).

Each model stage becomes a plan row against the study's ``plan_device`` (default: its ``device``):

* ``pretrain`` / ``train``: a training step of the backbone at the stage's batch size
  (``contrastive`` at twice the batch: two views of every image go through the encoder; ``mim``
  planned as the full image, an upper bound, since MAE's encoder sees only the visible patches);
* ``extract``: forward-only (``tightfit.memory.inference``), the largest batch that fits when
  ``batch_size: auto``;
* ``sparse-code``, ``classify``, ``evaluate``: CPU stages, against the host's RAM.

Input shapes come from the stage's ``input``, else the study's ``input``, else the data.
"""

from __future__ import annotations

from tightfit.errors import ConfigError
from tightfit.memory.pipeline import PipelineConfig, StageConfig
from tightfit.study.spec import StudyConfig, model_of, topological_order


def study_pipeline(config: StudyConfig, *, samples_count: tuple[int, int] | None = None) -> PipelineConfig:
    """The :class:`PipelineConfig` that plans ``config`` (see the module doc).

    Args:
        config: the study.
        samples_count: ``(development, evaluation)`` sample counts, when the data is at hand.
    """
    development, evaluation = samples_count or (None, None)
    stages = []
    for name in topological_order(config):
        stage = config.stage(name)
        note = stage.note
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
            stages.append(StageConfig(name=name, kind="train", model=spec, input=shape, batch_size=batch,
                                      precision=precision, samples=development, model_kwargs=kwargs, note=note))
        else:
            stages.append(StageConfig(name=name, kind="cpu", samples=evaluation, note=note or f"{stage.kind} on the CPU"))
    return PipelineConfig(name=config.name, device=config.plan_device or _profile_name(config.device),
                          memory=config.memory, margin=config.margin, stages=stages)


def _profile_name(device: str) -> str | None:
    return None if device == "auto" else device
