"""What each stage kind does when it runs. Each function takes the run's :class:`StageContext`
and returns the stage's outcome: metrics for MLflow, the time estimated before it ran, and notes.

Model stages (pretrain, train) go through :class:`~tightfit.training.trainer.Trainer`; extract
runs the frozen backbone under ``torch.inference_mode`` and writes a shard per batch; the CPU
stages call :mod:`tightfit.study.classify` and :mod:`tightfit.study.evaluate`.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from tightfit.errors import ConfigError
from tightfit.study.data import StudySamples
from tightfit.study.spec import VALIDATION_SHARE, StudyConfig, model_of
from tightfit.study.tracking import StudyTracker, TrainerMetrics

RUN_FOLDER = "run"
FEATURES_FOLDER = "features"
CPU_AUTO_BATCH_CAP = 256  # on the CPU a bigger batch is not faster, and a shard per batch bounds loss


@dataclass
class StageContext:
    """What a running stage needs from the study."""

    config: StudyConfig
    samples: StudySamples
    folder: Path
    device: torch.device
    tracker: StudyTracker
    run_id: str | None
    resume: bool
    console: Any
    stage_dirs: dict[str, Path] = field(default_factory=dict)
    profile: Any = None  # the GPU's DeviceProfile, when an extract stage sizes its batch there

    def stage_dir(self, name: str) -> Path:
        return self.stage_dirs[name]


@dataclass
class Outcome:
    metrics: dict[str, float] = field(default_factory=dict)
    estimated_s: float | None = None
    notes: list[str] = field(default_factory=list)


class _Images(Dataset):
    """The images of some samples, without labels (what self-supervised stages see)."""

    def __init__(self, samples: StudySamples, indices: np.ndarray):
        self.samples, self.indices = samples, indices
        # the trainer gives loader workers only to data read from disk (tightfit.data.build)
        self.in_memory = getattr(samples.dataset, "in_memory", False)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> torch.Tensor:
        return self.samples.dataset[int(self.indices[position])]


class _Labelled(_Images):
    def __getitem__(self, position: int):
        index = int(self.indices[position])
        return self.samples.dataset[index], int(self.samples.labels[index])


# ------------------------------------------------------------------------------------ helpers
def build_backbone(context: StageContext, stage, notes: list[str] | None = None) -> torch.nn.Module:
    """The stage's model, with the weights of the stage it reads (or of ``weights:``) loaded.

    A first convolution built for other channels than the samples have (a torchvision ResNet-50 or
    ViT on 1-channel slices or 4 modalities) is adapted after the weights are in
    (:func:`~tightfit.study.backbone.adapt_input_channels`). What was done goes to ``notes``.
    """
    from tightfit.models.spec import build_model
    from tightfit.study.backbone import adapt_input_channels, load_backbone_weights, read_state_dict

    notes = notes if notes is not None else []
    spec, kwargs = model_of(context.config, stage)
    user_weights = getattr(stage, "weights", None)
    num_classes = None if user_weights else context.samples.num_classes
    torch.manual_seed(context.config.seed)  # the same initial weights on every run (and on --resume)
    model = build_model(spec, num_classes=num_classes, **kwargs)
    try:
        if stage.source and stage.kind != "classify":
            source = context.config.stage(stage.source[0])
            state = read_state_dict(context.stage_dir(source.name) / RUN_FOLDER)
            load_backbone_weights(model, state, prefix="encoder." if source.kind == "pretrain" else "")
        elif user_weights:
            state = read_state_dict(user_weights)
            prefix = "encoder." if state and all(key.startswith("encoder.") for key in state) else ""
            load_backbone_weights(model, state, prefix=prefix)
            notes.append(f"weights from {user_weights}")
        else:
            notes.append(f"{spec} starts from random weights (no weights: file, no from: stage)")
    except ConfigError as error:
        raise ConfigError(f"stage {stage.name!r}: {error}") from None
    adapted = adapt_input_channels(model, _input_shape(context, stage)[0])
    if adapted:
        notes.append(adapted)
    return model


def _split_development(samples: StudySamples, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """A stratified validation share of the development part (for the best checkpoint), when it is big enough."""
    from sklearn.model_selection import train_test_split

    development = samples.development
    validation = max(round(VALIDATION_SHARE * len(development)), samples.num_classes)
    if len(development) - validation < samples.num_classes:
        return development, None  # too few samples to hold some out: train on all, keep the last checkpoint
    train, val = train_test_split(
        development, test_size=validation, stratify=samples.labels[development], random_state=seed
    )
    return np.sort(train), np.sort(val)


def _input_shape(context: StageContext, stage) -> tuple[int, ...]:
    shape = context.samples.input_shape
    slices = getattr(stage, "slices", None)
    if slices is not None:
        if len(shape) != 4:
            raise ConfigError(f"stage {stage.name!r}: slices: the samples are not volumes (shape {shape})")
        shape = tuple(side for axis, side in enumerate(shape) if axis != slices.axis + 1)
    return shape


def _slices_per_sample(shape: tuple[int, ...], slices) -> int:
    """How many 2D slices of a ``C x D x H x W`` sample go through the backbone (at most, for ``foreground``)."""
    if slices is None:
        return 1
    total = shape[slices.axis + 1]
    return min(slices.count, total) if slices.select == "central" else total


def _forward_seconds_per_sample(
    model: torch.nn.Module, shape: tuple[int, ...], device: torch.device, precision: str, batch_size: int = 32
) -> float:
    """Seconds per sample of a forward pass of ``model`` on this machine (median of 3 batches after a warm-up)."""
    from tightfit.plan.inference import forward_time_per_sample

    def factory(batch: int, where: Any) -> torch.Tensor:
        return torch.rand(batch, *shape, device=where)

    model.to(device)
    return forward_time_per_sample(model, factory, batch_size=batch_size, precision=precision, device=device, batches=3)


def _training_step_seconds(
    model: torch.nn.Module,
    dataset: Dataset,
    batch_size: int,
    precision: str,
    device: torch.device,
    optimizer: str,
    steps: int = 3,
) -> float:
    """Seconds of one training step of ``model`` on a real batch of ``dataset``, timed on this machine.

    The trainer's own step (:class:`~tightfit.step.step.TrainingStep`) runs on a copy of the model,
    so the stage's weights are untouched.
    """
    import copy

    from torch.utils.data import default_collate

    from tightfit.memory.counted_step import StepSettings, make_step
    from tightfit.step.optim import build_optimizer

    probe = copy.deepcopy(model).to(device).train()
    window = default_collate([dataset[index] for index in range(min(batch_size, len(dataset)))])
    step = make_step(
        probe, build_optimizer(optimizer, probe.parameters()), StepSettings(batch_size, precision, optimizer), device
    )
    step(window)  # warm-up: kernels, optimizer state
    started = time.perf_counter()
    for _ in range(steps):
        step(window)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / steps


# ------------------------------------------------------------------------------------ stages
def run_training(context: StageContext, stage, stage_dir: Path) -> Outcome:
    """pretrain and train: through the Trainer, checkpoints under ``STAGE/run``."""
    from tightfit.config import build_config
    from tightfit.report.callback import report_callbacks
    from tightfit.runs.checkpoint import complete_checkpoint
    from tightfit.step.precision import resolve_precision
    from tightfit.study.ssl import wrap_for_objective
    from tightfit.training.trainer import Trainer

    config = context.config
    backbone = build_backbone(context, stage)
    model = wrap_for_objective(backbone, stage) if stage.kind == "pretrain" else backbone
    train, val = _split_development(context.samples, config.seed)
    dataset = _Images if stage.kind == "pretrain" else _Labelled
    precision, _ = resolve_precision(stage.precision, context.device.type)
    train_set = dataset(context.samples, train)
    val_set = dataset(context.samples, val) if val is not None else None
    step_s = _training_step_seconds(
        model,
        train_set,
        stage.batch_size,
        precision,
        context.device,
        stage.trainer.get("optimizer", {}).get("name", "adamw"),
    )
    # validation: forward only, about a third of a step per batch
    val_batches = math.ceil(len(val) / stage.batch_size) if val is not None else 0
    estimated = step_s * stage.epochs * (math.ceil(len(train) / stage.batch_size) + val_batches / 3)
    run_dir = stage_dir / RUN_FOLDER
    tree = {
        "epochs": stage.epochs,
        "seed": config.seed,
        "run_dir": str(run_dir),
        "device": context.device.type,
        "precision": stage.precision,
        "threads": config.threads,
        "batch": {"micro_batch_size": stage.batch_size},
        "optimizer": {"lr": stage.lr},
        "logging": {"tensorboard": False, "mlflow": False},
    }
    for key, value in stage.trainer.items():
        tree[key] = {**tree[key], **value} if isinstance(tree.get(key), dict) and isinstance(value, dict) else value
    try:
        train_config = build_config(tree, source=f"stage {stage.name!r} trainer")
    except ConfigError as error:
        raise ConfigError(f"stage {stage.name!r}: {error}") from None
    resume_from = run_dir if context.resume and complete_checkpoint(run_dir / "checkpoints" / "last") else None
    trainer = Trainer(
        train_config,
        model=model,
        datasets=(train_set, val_set, None),
        callbacks=[TrainerMetrics(context.tracker, context.run_id), *report_callbacks(train_config)],
    )
    summary = trainer.fit(resume_from=resume_from)
    metrics = {
        key: value for key, value in summary.items() if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    notes = [f"trained on {len(train)} development samples, validated on {len(val) if val is not None else 0}"]
    if resume_from is not None:
        notes.append("resumed from the last checkpoint")
    return Outcome(metrics, estimated, notes)


def run_extract(context: StageContext, stage, stage_dir: Path) -> Outcome:
    """Features of every evaluation sample, a shard per batch; ``--resume`` continues after the last shard."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from tightfit.step.precision import autocast
    from tightfit.study.backbone import FeatureExtractor
    from tightfit.study.features import samples_written, shards, write_shard

    samples = context.samples
    device = context.device
    precision = "fp32" if stage.precision == "auto" else stage.precision
    if precision == "fp16" and device.type == "cpu":
        precision = "bf16"  # CPU autocast runs bf16; fp16 matmuls are not supported there
    from tightfit.study.backbone import Normalize

    built: list[str] = []
    backbone = build_backbone(context, stage, built).to(device).eval()
    shape = _input_shape(context, stage)
    normalize = Normalize(shape[0]).to(device) if stage.normalize == "imagenet" else None
    extractor = FeatureExtractor(backbone, stage.layer, stage.pooling, normalize)
    folder = stage_dir / FEATURES_FOLDER
    progress_file = stage_dir / "extract.json"
    batch_size = _extract_batch_size(context, stage, backbone, shape, precision)
    done = 0
    if context.resume and progress_file.is_file() and shards(folder):
        batch_size = json.loads(progress_file.read_text())["batch_size"]  # same batches as before: same shards
        done = samples_written(folder)
    stage_dir.mkdir(parents=True, exist_ok=True)
    progress_file.write_text(json.dumps({"batch_size": batch_size}))
    order = samples.evaluation
    slices_per_sample = _slices_per_sample(samples.input_shape, stage.slices)
    per_sample = (
        _forward_seconds_per_sample(
            extractor, shape, device, precision, batch_size=min(batch_size * slices_per_sample, 256)
        )
        * slices_per_sample
    )
    estimated = per_sample * len(order)
    started = time.perf_counter()
    columns = (
        TextColumn(f"[bold]extract {stage.name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=context.console, transient=False) as progress:
        task = progress.add_task("extract", total=len(order), completed=done)
        for start in range(done, len(order), batch_size):
            indices = order[start : start + batch_size]
            images = torch.stack([samples.dataset[int(index)] for index in indices]).to(device)
            with torch.inference_mode(), autocast(precision, device.type):
                features = _features(extractor, images, stage.slices)
            write_shard(
                folder,
                start // batch_size,
                features.float().cpu().numpy(),
                samples.labels[indices],
                indices,
                [samples.ids[int(index)] for index in indices],
            )
            progress.update(task, advance=len(indices))
    seconds = time.perf_counter() - started
    extracted = len(order) - done
    metrics = {
        "samples": len(order),
        "batch_size": batch_size,
        "samples_per_s": extracted / seconds if seconds > 0 and extracted else 0.0,
    }
    notes = [f"{len(order)} evaluation samples, batch {batch_size}, {precision}, layer {extractor.layer}", *built]
    if done:
        notes.append(f"resumed after {done} samples already extracted")
    return Outcome(metrics, estimated, notes)


def _features(extractor, images: torch.Tensor, slices) -> torch.Tensor:
    """One feature vector per sample; with ``slices``, the selected 2D slices' features aggregated per subject."""
    if slices is None:
        return extractor(images)
    stacked = images.movedim(slices.axis + 2, 1)  # (batch, slices, C, ., .): batch, channel, then D H W
    if slices.select == "central":
        count = min(slices.count, stacked.shape[1])
        start = (stacked.shape[1] - count) // 2
        stacked = stacked[:, start : start + count]
    if slices.select != "foreground":
        features = extractor(stacked.flatten(0, 1)).reshape(stacked.shape[0], stacked.shape[1], -1)
        return _aggregate(features, slices.aggregate)
    vectors = []
    for volume in stacked:  # a different number of slices per subject
        keep = volume.flatten(1).ne(0).any(1)
        chosen = volume[keep] if bool(keep.any()) else volume  # an empty volume keeps all its slices
        vectors.append(_aggregate(extractor(chosen)[None], slices.aggregate)[0])
    return torch.stack(vectors)


def _aggregate(features: torch.Tensor, how: str) -> torch.Tensor:
    """``(batch, slices, width)`` -> ``(batch, width)`` (mean, max) or ``(batch, slices * width)`` (all)."""
    if how == "mean":
        return features.mean(1)
    if how == "max":
        return features.amax(1)
    return features.flatten(1)


def _extract_batch_size(
    context: StageContext, stage, backbone: torch.nn.Module, shape: tuple[int, ...], precision: str
) -> int:
    """``batch_size: auto``: the memory engine's largest forward-only batch on this device.

    On a GPU the budget is the device profile's usable memory (with its overhead); on the CPU it
    is the memory available now, capped at ``CPU_AUTO_BATCH_CAP`` samples.
    """
    if stage.batch_size != "auto":
        return stage.batch_size
    from tightfit.plan.inference import largest_batch

    slices = _slices_per_sample(context.samples.input_shape, stage.slices)

    def factory(batch_size: int, where: Any) -> torch.Tensor:
        return torch.rand(batch_size * slices, *shape, device=where)

    if context.device.type == "cpu":
        import psutil

        profile, budget, cap, where = (
            None,
            psutil.virtual_memory().available,
            CPU_AUTO_BATCH_CAP,
            "this machine's free RAM",
        )
    else:
        profile, budget, cap, where = (
            context.profile,
            context.profile.usable_bytes,
            4096,
            f"{context.profile.name}'s memory",
        )
    batch, _ = largest_batch(
        backbone,
        factory,
        budget_bytes=budget,
        precision=precision,
        profile=profile,
        margin=context.config.margin,
        max_batch_size=cap,
    )
    if batch == 0:
        raise ConfigError(f"stage {stage.name!r}: batch_size: not even one sample fits in {where}")
    return batch


def run_sparse_code(context: StageContext, stage, stage_dir: Path) -> Outcome:
    """Dictionary learning on the standardised features of its extract stage; the codes are the new features."""
    from sklearn.decomposition import MiniBatchDictionaryLearning
    from sklearn.preprocessing import StandardScaler

    from tightfit.study.features import read_features, write_shard

    source = read_features(context.stage_dir(stage.source[0]) / FEATURES_FOLDER)
    standard = StandardScaler().fit_transform(source.features)
    started = time.perf_counter()
    learner = MiniBatchDictionaryLearning(
        n_components=stage.n_components,
        alpha=stage.alpha,
        max_iter=stage.max_iter,
        random_state=context.config.seed,
        transform_algorithm="omp" if stage.algorithm == "omp" else "lasso_cd",
        transform_n_nonzero_coefs=stage.n_nonzero if stage.algorithm == "omp" else None,
        transform_alpha=stage.alpha if stage.algorithm == "lasso" else None,
    )
    from tightfit.study.classify import ConvergenceCount

    with warnings.catch_warnings(), ConvergenceCount() as unconverged:
        # OMP stopping early on dependent atoms: see classify.SparseRepresentationClassifier
        warnings.filterwarnings("ignore", message="Orthogonal matching pursuit ended prematurely")
        codes = learner.fit_transform(standard)
    write_shard(stage_dir / FEATURES_FOLDER, 0, codes, source.labels, source.sample_index, source.ids)
    sparsity = float(np.mean(codes != 0))
    return Outcome(
        {"nonzero_share": sparsity, "seconds_fit": time.perf_counter() - started},
        None,
        [
            f"{stage.n_components} atoms learnt on {len(source)} samples without labels; {sparsity:.1%} of codes "
            "non-zero",
            *unconverged.note(),
        ],
    )


def run_classify(context: StageContext, stage, stage_dir: Path) -> Outcome:
    """Every classifier on every arm over the shared folds; predictions and scores to ``predictions.npz``."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from tightfit.study.classify import ConvergenceCount, fit_fold, shared_folds
    from tightfit.study.features import read_features

    config = context.config
    arms = {name: read_features(context.stage_dir(name) / FEATURES_FOLDER) for name in stage.source}
    reference = next(iter(arms.values()))
    for name, arm in arms.items():
        if arm.ids != reference.ids:
            raise ConfigError(f"stage {stage.name!r}: from: {name!r} holds other samples than {stage.source[0]!r}")
    labels = reference.labels
    num_classes = context.samples.num_classes
    groups = context.samples.groups[reference.sample_index]
    folds = shared_folds(labels, groups, config.cv.folds, config.cv.repeats, config.cv.seed)
    repeats = config.cv.repeats
    units = [
        (arm, classifier, number) for classifier in stage.classifiers for arm in arms for number in range(len(folds))
    ]
    # the first fold of the first arm for each classifier runs first: its time gives the estimate
    pilots = [unit for unit in units if unit[0] == stage.source[0] and unit[2] == 0]
    units = pilots + [unit for unit in units if unit not in pilots]
    results: dict[str, dict[str, Any]] = {
        arm: {
            classifier.name: {
                "predictions": np.full((repeats, len(labels)), -1, dtype=np.int64),
                "scores": np.zeros((repeats, len(labels), num_classes), dtype=np.float32),
                "fold_accuracy": [],
                "chosen": [],
                "seconds": 0.0,
            }
            for classifier in stage.classifiers
        }
        for arm in arms
    }
    estimated = None
    pilot_seconds = 0.0
    unconverged = ConvergenceCount()
    columns = (
        TextColumn(f"[bold]classify {stage.name}" + " {task.fields[what]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=context.console) as progress:
        task = progress.add_task("classify", total=len(units), what="")
        for position, (arm, classifier, number) in enumerate(units):
            progress.update(task, what=f"{arm} / {classifier.name}")
            repeat, train, test = folds[number]
            started = time.perf_counter()
            with unconverged:
                fold = fit_fold(
                    classifier,
                    arms[arm].features,
                    labels,
                    train,
                    test,
                    num_classes=num_classes,
                    seed=config.cv.seed,
                    n_jobs=stage.n_jobs,
                    groups=groups,
                )
            elapsed = time.perf_counter() - started
            record = results[arm][classifier.name]
            record["predictions"][repeat, test] = fold["predictions"]
            record["scores"][repeat, test] = fold["scores"]
            record["fold_accuracy"].append(float(np.mean(fold["predictions"] == labels[test])))
            record["chosen"].append(fold.get("chosen"))
            record["seconds"] += elapsed
            if position < len(pilots):
                pilot_seconds += elapsed
                if position == len(pilots) - 1:
                    estimated = pilot_seconds * len(arms) * len(folds)
            progress.update(task, advance=1)
    arrays = {}
    summary = {
        "arms": list(arms),
        "classifiers": [classifier.name for classifier in stage.classifiers],
        "labels": labels.tolist(),
        "ids": reference.ids,
        "groups": groups.tolist(),
        "folds": config.cv.folds,
        "repeats": repeats,
        "fold_sizes": [[len(train), len(test)] for _, train, test in folds],
        "results": {},
    }
    metrics = {}
    for arm, by_classifier in results.items():
        summary["results"][arm] = {}
        for name, record in by_classifier.items():
            arrays[f"{arm}/{name}/predictions"] = record["predictions"]
            arrays[f"{arm}/{name}/scores"] = record["scores"]
            summary["results"][arm][name] = {
                "fold_accuracy": record["fold_accuracy"],
                "chosen": record["chosen"],
                "seconds": record["seconds"],
            }
            metrics[f"{arm}.{name}.accuracy"] = float(np.mean(record["fold_accuracy"]))
    np.savez_compressed(stage_dir / "predictions.npz", **arrays)
    (stage_dir / "classification.json").write_text(json.dumps(summary, indent=1))
    return Outcome(
        metrics,
        estimated,
        [f"{len(arms)} arms x {len(stage.classifiers)} classifiers x {len(folds)} folds", *unconverged.note()],
    )


def run_evaluate(context: StageContext, stage, stage_dir: Path) -> Outcome:
    """The statistics of its classify stage (``tightfit.study.evaluate``)."""
    from tightfit.study.evaluate import evaluate_classification

    statistics = evaluate_classification(
        context.stage_dir(stage.source[0]),
        stage_dir,
        class_names=context.samples.class_names,
        resamples=stage.bootstrap,
        confidence=stage.confidence,
        posthoc=stage.posthoc,
        seed=context.config.seed,
    )
    metrics = {f"{row['arm']}.{row['classifier']}.accuracy": row["accuracy"] for row in statistics["table"]}
    return Outcome(metrics, None, [f"{len(statistics['table'])} arm x classifier rows"])


RUNNERS = {
    "pretrain": run_training,
    "train": run_training,
    "extract": run_extract,
    "sparse-code": run_sparse_code,
    "classify": run_classify,
    "evaluate": run_evaluate,
}
"""kind -> the function that runs a stage of that kind."""
