"""The study file: typed stages forming a graph, validated before anything runs.

A study file is the pipeline file ``tightfit plan`` reads, with stages that ``tightfit run`` can
execute. Every stage names its inputs with ``from:``; :func:`load_study` checks the whole graph
(unknown names, a ``from`` of the wrong kind, cycles, missing data or weights, bad keys) and
raises one :class:`~tightfit.errors.ConfigError` line naming the stage and the key, before any
file is written.

.. code-block:: yaml

    # tightfit run examples/pipelines/digits-study.yaml
    name: digits study
    data: {source: digits, development_fraction: 0.5}
    cv: {folds: 5, repeats: 2, seed: 0}
    stages:
      - {name: vit-mim, kind: pretrain, objective: mim, model: builtin:vit, model_kwargs: {...}}
      - {name: vit-mim-features, kind: extract, from: vit-mim}
      - {name: classify, kind: classify, from: [vit-mim-features], classifiers: [svm, src]}
      - {name: statistics, kind: evaluate, from: classify}

Stage kinds and what their ``from`` may name:

==============  =========================================  ==================================
kind            what it does                               ``from``
==============  =========================================  ==================================
pretrain        self-supervised (``objective: mim`` or     nothing, or a pretrain stage
                ``contrastive``) on the development part
train           supervised, on the development part        nothing, a pretrain or train stage
extract         frozen backbone -> features of the         a pretrain or train stage, or
                evaluation part                            nothing with ``model``
sparse-code     dictionary learning, sparse codes          one extract stage
classify        classifiers cross-validated on features    extract / sparse-code stages
evaluate        statistics between arms, results files     one classify stage
==============  =========================================  ==================================
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, TypeAdapter, ValidationError, field_validator

from tightfit.errors import ConfigError
from tightfit.names import INFERENCE_PRECISIONS

STAGE_KINDS = ("pretrain", "train", "extract", "sparse-code", "classify", "evaluate")
CLASSIFIERS = ("svm", "src", "logreg", "knn")
OBJECTIVES = ("mim", "contrastive")

# kind -> the kinds its ``from`` may name (an empty tuple: it takes no input).
ALLOWED_FROM: dict[str, tuple[str, ...]] = {
    "pretrain": ("pretrain",),
    "train": ("pretrain", "train"),
    "extract": ("pretrain", "train"),
    "sparse-code": ("extract",),
    "classify": ("extract", "sparse-code"),
    "evaluate": ("classify",),
}
FEATURE_KINDS = ("extract", "sparse-code")
VALIDATION_SHARE = 0.15
"""Share of the development part that pretrain/train stages hold out for the trainer's validation."""


class _Stage(BaseModel, extra="forbid"):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    source: list[str] = Field(default_factory=list, alias="from")
    note: str = ""

    @field_validator("source", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value


class _ModelStage(_Stage):
    model: str | None = Field(None, description="a model spec; default: the model of the stage named in from")
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    input: str | None = Field(None, description="per-sample input shape for the plan; default: the study's")
    precision: Literal[("auto", *INFERENCE_PRECISIONS)] = "auto"


class _TrainingStage(_ModelStage):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    trainer: dict[str, Any] = Field(
        default_factory=dict,
        description="any other tightfit train setting (schedule, checkpointing, ...); of data: only num_workers, "
        "pin_memory",
    )


class PretrainStage(_TrainingStage):
    """Self-supervised pre-training through the Trainer (``tightfit.study.ssl``)."""

    kind: Literal["pretrain"]
    objective: Literal["mim", "contrastive"]
    mask_ratio: float = Field(0.75, gt=0, lt=1, description="mim: share of patches hidden")
    decoder_dim: int = Field(64, ge=1, description="mim: width of the light decoder")
    decoder_depth: int = Field(1, ge=1, description="mim: transformer blocks in the decoder")
    temperature: float = Field(0.2, gt=0, description="contrastive: NT-Xent temperature")
    projection_dim: int = Field(64, ge=1, description="contrastive: output of the projection head")


class TrainStage(_TrainingStage):
    """Supervised training (or fine-tuning) through the Trainer."""

    kind: Literal["train"]


class SliceConfig(BaseModel, extra="forbid"):
    """``slices:`` extract a volume as 2D slices along ``axis`` and aggregate their features per subject."""

    axis: int = Field(0, ge=0, le=2, description="0, 1 or 2: depth, height or width of C x D x H x W")
    select: Literal["all", "central", "foreground"] = Field(
        "all", description="every slice, the central `count`, or those with a non-zero voxel"
    )
    count: int = Field(16, ge=1, description="select: central: how many slices around the middle")
    aggregate: Literal["mean", "max", "all"] = "mean"


class ExtractStage(_ModelStage):
    """A frozen backbone's features of every evaluation sample, written as shards."""

    kind: Literal["extract"]
    weights: str | None = Field(None, description="a state dict, a .safetensors file or a tightfit run folder")
    layer: str | None = Field(
        None, description="module whose output is the feature; default: the input of the last Linear"
    )
    pooling: Literal["auto", "cls", "mean", "max", "flatten"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    slices: SliceConfig | None = None
    normalize: Literal["none", "imagenet"] = Field(
        "none", description="imagenet: the mean/std ImageNet weights expect (per-channel averages for 1 or 4 channels)"
    )


class SparseCodeStage(_Stage):
    """Dictionary learning on features; the sparse codes become an arm of their own."""

    kind: Literal["sparse-code"]
    n_components: int = Field(128, ge=1)
    alpha: float = Field(0.5, gt=0, description="sparsity penalty of the dictionary learning")
    algorithm: Literal["omp", "lasso"] = "lasso"
    n_nonzero: int = Field(10, ge=1, description="omp: non-zero coefficients per code")
    max_iter: int = Field(30, ge=1)


class ClassifierConfig(BaseModel, extra="forbid"):
    """One classifier of a classify stage (``tightfit.study.classify``)."""

    name: Literal["svm", "src", "logreg", "knn"]
    C: list[float] = Field(default_factory=lambda: [0.1, 1.0, 10.0, 100.0], description="svm: grid of C")
    gamma: list[float | Literal["scale"]] = Field(
        default_factory=lambda: ["scale", 0.001, 0.01, 0.1], description="svm: grid of RBF gamma"
    )
    inner_folds: int = Field(3, ge=2, description="svm: folds of the inner (nested) cross-validation")
    solver: Literal["omp", "lasso"] = Field("omp", description="src: sparse coder")
    n_nonzero: int = Field(20, ge=1, description="src omp: non-zero coefficients per code")
    alpha: float = Field(0.01, gt=0, description="src lasso: l1 penalty")
    chunk_size: int = Field(256, ge=1, description="src: test samples coded at once (bounds memory)")
    neighbours: int = Field(5, ge=1, description="knn: k")


class ClassifyStage(_Stage):
    """Every classifier on every feature arm, over the study's shared folds."""

    kind: Literal["classify"]
    classifiers: list[ClassifierConfig] = Field(min_length=1)
    n_jobs: int = Field(1, description="CPU workers for SVM grid search and SRC coding (-1: every core)")

    @field_validator("classifiers", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": item} if isinstance(item, str) else item for item in value]
        return value


class EvaluateStage(_Stage):
    """Statistics over a classify stage: results.json, results.md, plots."""

    kind: Literal["evaluate"]
    bootstrap: int = Field(1000, ge=100, description="bootstrap resamples for the confidence intervals")
    confidence: float = Field(0.95, gt=0.5, lt=1)
    posthoc: Literal["holm", "nemenyi"] = "holm"


Stage = Annotated[
    PretrainStage | TrainStage | ExtractStage | SparseCodeStage | ClassifyStage | EvaluateStage,
    Field(discriminator="kind"),
]
_STAGE_MODELS = {
    "pretrain": PretrainStage,
    "train": TrainStage,
    "extract": ExtractStage,
    "sparse-code": SparseCodeStage,
    "classify": ClassifyStage,
    "evaluate": EvaluateStage,
}


class Preprocess(BaseModel, extra="forbid"):
    """``data.preprocess:`` MONAI transforms applied to every sample, in this order (``tightfit.study.medical``)."""

    orientation: str | None = Field("RAS", description="Orientationd axcodes (volumes); null keeps the stored axes")
    spacing: list[float] | None = Field(None, min_length=3, max_length=3, description="Spacingd pixdim in mm (volumes)")
    clip_percentiles: list[float] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="ScaleIntensityRangePercentilesd: clip to these percentiles, per channel",
    )
    zscore: bool = Field(True, description="NormalizeIntensityd(nonzero=True, channel_wise=True)")
    crop_foreground: bool = Field(False, description="CropForegroundd on the non-zero voxels")
    shape: list[int] | None = Field(None, description="ResizeWithPadOrCropd to this spatial shape")


class StudyData(BaseModel, extra="forbid"):
    """``data:`` the labelled samples of the study and the part kept for (pre-)training."""

    source: Literal["digits", "volumes", "medical", "images"] = "digits"
    path: str | None = Field(
        None, description="volumes: one sub-folder of volumes per class; medical, images: one folder per subject"
    )
    labels: str | None = Field(
        None, description="medical, images: CSV subject,label[,group] (default: PATH/labels.csv)"
    )
    modalities: list[str] = Field(
        default_factory=lambda: ["*.nii.gz"],
        min_length=1,
        description="medical: one file-name pattern per channel (a NIfTI file or a DICOM folder in each subject "
        "folder)",
    )
    preprocess: Preprocess = Field(default_factory=Preprocess)
    development_fraction: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="share of samples (stratified) that train/pretrain stages learn from; the rest is evaluated",
    )
    limit: int | None = Field(None, ge=10, description="use at most this many samples (stratified), for quick runs")
    samples: int | None = Field(
        None, ge=2, description="planning: how many samples (subjects) the data holds, when it is not at hand"
    )


class CrossValidation(BaseModel, extra="forbid"):
    """``cv:`` the folds every arm and classifier share, so comparisons are paired."""

    folds: int = Field(5, ge=2)
    repeats: int = Field(1, ge=1)
    seed: int = 0


class Tracking(BaseModel, extra="forbid"):
    """``tracking:`` MLflow (a parent run for the study, a nested run per stage)."""

    mlflow: bool = True
    uri: str | None = Field(None, description="default: a file store in STUDY_FOLDER/mlruns")
    experiment: str | None = Field(None, description="default: the study's name")


class StudyConfig(BaseModel, extra="forbid"):
    """A study file."""

    name: str = "study"
    folder: str | None = Field(None, description="default: studies/<file name without .yaml>")
    device: str = Field("auto", description="where model stages run: auto, cpu, cuda, mps")
    plan_device: str | None = Field(None, description="device profile for the plan (default: device)")
    memory: str | int | None = None
    margin: float = Field(0.1, ge=0, lt=1)
    seed: int = 0
    threads: int | None = Field(None, ge=1)
    input: str | None = Field(None, description="per-sample input shape, for planning without data")
    data: StudyData = Field(default_factory=StudyData)
    cv: CrossValidation = Field(default_factory=CrossValidation)
    tracking: Tracking = Field(default_factory=Tracking)
    stages: list[Stage] = Field(min_length=1)

    def stage(self, name: str):
        return next(stage for stage in self.stages if stage.name == name)


def is_study_file(raw: Any) -> bool:
    """Whether a parsed pipeline file is a study (its stages have study kinds) rather than a plan-only pipeline."""
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), list):
        return False
    return any(isinstance(stage, dict) and stage.get("kind") in STAGE_KINDS for stage in raw["stages"])


def read_study_yaml(path: str | Path) -> dict:
    """Read a study file into a dict through the shared settings reader, or raise a one-line ConfigError."""
    from tightfit.settings import read_yaml

    return read_yaml(path, what="study file")


def load_study(
    path: str | Path, *, check_files: bool = True, trust_code: bool = False, data_path: str | None = None
) -> StudyConfig:
    """Read, validate and check the graph of a study file.

    Args:
        path: the YAML file.
        check_files: also check that data folders and weight files exist (off for planning).
        trust_code: let a stage's ``model`` be a ``module.path:callable`` spec (``--trust-code``);
            without it such a spec is refused, as in every file tightfit reads.
        data_path: replaces ``data.path`` (``tightfit run --data DIR``), before the checks.

    Returns:
        The :class:`StudyConfig`, its stages in file order.

    Raises:
        ConfigError: one line naming the file, the stage and the key.
    """
    path = Path(path)
    raw = read_study_yaml(path)
    try:
        config = StudyConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{path}: {_describe(error, raw)}") from None
    if data_path is not None:
        config.data.path = str(data_path)
    from tightfit.trust import check_spec_from_file

    for stage in config.stages:
        if getattr(stage, "model", None) is not None:
            check_spec_from_file(stage.model, where=f"{path}: stage {stage.name!r}: model", trust_code=trust_code)
    try:
        check_graph(config)
        check_stage_settings(config)
        if check_files:
            check_inputs_exist(config)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    if config.folder is None:
        config.folder = str(Path("studies") / path.stem)
    return config


def _describe(error: ValidationError, raw: dict) -> str:
    """The first validation problem as ``stage 'x' key: what is wrong`` with the closest key."""
    problem = error.errors()[0]
    location = list(problem["loc"])
    where = ""
    if location[:1] == ["stages"] and len(location) > 1 and isinstance(location[1], int):
        index = location[1]
        stage = raw["stages"][index] if index < len(raw.get("stages", [])) else {}
        name = stage.get("name", f"#{index + 1}") if isinstance(stage, dict) else f"#{index + 1}"
        where = f"stage {name!r}: "
        # pydantic puts the discriminator value (the kind) in the location: drop it
        location = [part for part in location[2:] if part not in STAGE_KINDS]
        model = _STAGE_MODELS.get(stage.get("kind")) if isinstance(stage, dict) else None
    else:
        model = StudyConfig
        for part in location[:-1]:
            field = getattr(model, "model_fields", {}).get(str(part))
            nested = getattr(field, "annotation", None)
            model = nested if isinstance(nested, type) and issubclass(nested, BaseModel) else None
            if model is None:
                break
    key = ".".join(str(part) for part in location if not isinstance(part, int)) or "kind"
    if problem["type"] == "extra_forbidden" and model is not None:
        valid = [field.alias or name for name, field in model.model_fields.items()]
        close = difflib.get_close_matches(str(location[-1]), valid, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (valid keys: {', '.join(valid)})"
        return f"{where}{key}: unknown key{hint}"
    if problem["type"] in ("union_tag_invalid", "union_tag_not_found"):
        return f"{where}kind: must be one of {', '.join(STAGE_KINDS)}"
    return f"{where}{key}: {problem['msg']}"


def check_graph(config: StudyConfig) -> list[str]:
    """Check names, ``from`` kinds and cycles; return the stage names in an order that runs.

    Raises:
        ConfigError: a duplicate or unknown name, a ``from`` of the wrong kind, or a cycle.
    """
    names = [stage.name for stage in config.stages]
    by_name = {}
    for stage in config.stages:
        if stage.name in by_name:
            raise ConfigError(f"stage {stage.name!r}: name: used by two stages")
        by_name[stage.name] = stage
    for stage in config.stages:
        allowed = ALLOWED_FROM[stage.kind]
        for source in stage.source:
            if source not in by_name:
                close = difflib.get_close_matches(source, names, n=1, cutoff=0.5)
                hint = f" (did you mean {close[0]!r}?)" if close else f" (stages: {', '.join(names)})"
                raise ConfigError(f"stage {stage.name!r}: from: unknown stage {source!r}{hint}")
            if by_name[source].kind not in allowed:
                raise ConfigError(
                    f"stage {stage.name!r}: from: {source!r} is a {by_name[source].kind} stage; "
                    f"a {stage.kind} stage takes {' or '.join(allowed)}"
                )
        single = stage.kind in ("sparse-code", "evaluate", "pretrain", "train")
        if single and len(stage.source) > 1:
            raise ConfigError(
                f"stage {stage.name!r}: from: a {stage.kind} stage takes one stage, got {len(stage.source)}"
            )
        if stage.kind in ("sparse-code", "classify", "evaluate") and not stage.source:
            raise ConfigError(f"stage {stage.name!r}: from: a {stage.kind} stage needs {' or '.join(allowed)} stages")
    return topological_order(config)


def topological_order(config: StudyConfig) -> list[str]:
    """Stage names so that every stage comes after the stages it reads (file order otherwise).

    Raises:
        ConfigError: the ``from`` links form a cycle (named).
    """
    order: list[str] = []
    state: dict[str, str] = {}
    by_name = {stage.name: stage for stage in config.stages}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = path[path.index(name) :] + [name]
            raise ConfigError(f"stage {name!r}: from: the stages form a cycle ({' -> '.join(cycle)})")
        state[name] = "visiting"
        for source in by_name[name].source:
            visit(source, path + [name])
        state[name] = "done"
        order.append(name)

    for stage in config.stages:
        visit(stage.name, [])
    return order


def model_of(config: StudyConfig, stage) -> tuple[str, dict]:
    """The model spec and constructor keywords a model stage uses (its own, or inherited through ``from``)."""
    current = stage
    while current.model is None and current.source:
        current = config.stage(current.source[0])
    if current.model is None:
        raise ConfigError(f"stage {stage.name!r}: model: needed (no stage in 'from' names one)")
    kwargs = dict(current.model_kwargs)
    kwargs.update(stage.model_kwargs if stage is not current else {})
    return current.model, kwargs


def check_stage_settings(config: StudyConfig) -> None:
    """Settings that depend on other parts of the file (model present, trainer keys valid, data path)."""
    from tightfit.config import TrainConfig

    for stage in config.stages:
        if stage.kind in ("pretrain", "train", "extract"):
            model_of(config, stage)
            if stage.kind == "extract" and stage.weights and stage.source:
                raise ConfigError(f"stage {stage.name!r}: weights: give either weights or from, not both")
            if (
                stage.kind == "extract"
                and stage.slices
                and stage.slices.select == "foreground"
                and stage.slices.aggregate == "all"
            ):
                raise ConfigError(
                    f"stage {stage.name!r}: slices.aggregate: 'all' needs the same slices for every "
                    "subject; with select: foreground use mean or max"
                )
        if stage.kind in ("pretrain", "train"):
            reserved = {"model", "model_options", "epochs", "run_dir", "device", "seed"} & set(stage.trainer)
            if reserved:
                raise ConfigError(f"stage {stage.name!r}: trainer.{sorted(reserved)[0]}: set by the study, not here")
            loader_keys = {"num_workers", "pin_memory"}
            data_keys = set(stage.trainer.get("data") or {}) - loader_keys
            if data_keys:
                raise ConfigError(
                    f"stage {stage.name!r}: trainer.data.{sorted(data_keys)[0]}: the study gives the data; "
                    f"only {', '.join(sorted(loader_keys))} can be set here"
                )
            unknown = set(stage.trainer) - set(TrainConfig.model_fields)
            if unknown:
                key = sorted(unknown)[0]
                close = difflib.get_close_matches(key, list(TrainConfig.model_fields), n=1, cutoff=0.5)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"stage {stage.name!r}: trainer.{key}: unknown setting{hint}")
    learns = [stage.name for stage in config.stages if stage.kind in ("pretrain", "train")]
    if learns and config.data.development_fraction == 0:
        raise ConfigError(
            f"stage {learns[0]!r}: data.development_fraction: 0 leaves no samples to train on "
            "(the evaluation part is never trained on)"
        )
    if config.data.source != "digits" and not config.data.path:
        raise ConfigError(f"data.path: the {config.data.source} source needs a folder")
    if config.data.source in ("medical", "images") and not config.data.labels:
        config.data.labels = str(Path(config.data.path) / "labels.csv")


def check_inputs_exist(config: StudyConfig) -> None:
    """Data folders and weight files named by the study exist (checked before anything runs)."""
    for key in ("path", "labels"):
        value = getattr(config.data, key)
        if value is not None and not Path(value).exists():
            raise ConfigError(f"data.{key}: {value} does not exist")
    for stage in config.stages:
        weights = getattr(stage, "weights", None)
        if weights is not None and not Path(weights).exists():
            from tightfit.study.backbone import KNOWN_WEIGHTS

            known = KNOWN_WEIGHTS.get(getattr(stage, "model", None) or "")
            where = f"; put {known} there" if known else " (a .pth state dict, a .safetensors file or a run folder)"
            raise ConfigError(f"stage {stage.name!r}: weights: {weights} does not exist{where}; nothing is downloaded")


def stage_settings(stage) -> dict:
    """A stage's settings as plain JSON data (what its manifest records and its cache key hashes)."""
    return TypeAdapter(Stage).dump_python(stage, mode="json", by_alias=True)
