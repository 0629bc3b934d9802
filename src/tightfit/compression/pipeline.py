"""``tightfit compress``: run a recipe's steps in order and measure every artifact.

The recipe, top to bottom::

    source   = load_source(run_dir)                 # model + best weights + data, as trained
    measure(original)                               # size, params, latency b1/bN, metric
    for step in recipe.steps:                       # prune, finetune, distill, qat, quantize, export
        model = apply(step, model)                  # through the trainer where it fine-tunes
        save(model) ; measure(model)                # one artifact per step, same measurements
    compare(records) ; flag ; choose best           # slower or worse than tolerance: flagged
    report.json + plots + table

Every step's artifact lands in ``OUTPUT/NN-step/``; a step that fails leaves no partial folder.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from tightfit.compression import benchmark
from tightfit.compression.export import (
    VerificationError,
    export_onnx,
    export_program,
    onnx_feeds,
    quantize_onnx,
    verify_onnx,
)
from tightfit.compression.prune import PolynomialSchedule, count_parameters, prune
from tightfit.compression.quantize import is_quantized, model_kind, quantize
from tightfit.compression.recipe import (
    DistillStep,
    ExportStep,
    FinetuneConfig,
    FinetuneStep,
    PruneStep,
    QatStep,
    QuantizeStep,
    Recipe,
    build_recipe,
    load_recipe,
)
from tightfit.compression.report import (
    ArtifactRecord,
    Metric,
    choose_best,
    clean_directory,
    compare,
    file_sizes,
    render_table,
    write_report,
)
from tightfit.compression.training import FinetuneSettings
from tightfit.errors import ConfigError
from tightfit.step.batch import count_samples, slice_batch
from tightfit.step.loss import model_output_tensor, split_batch, task_loss
from tightfit.units import plural


@dataclass
class Source:
    """A trained model and its data, as the compression steps need them.

    Attributes:
        model: the trained model (CPU, eval mode).
        data: a ``DataBundle`` (or anything with ``train``/``val``/``test`` and ``collate_fn``).
        name: a short name for the report.
        model_spec: how the model was built (``builtin:digits-cnn``), when known.
        metadata: what ``tightfit predict`` needs: class names, input shape, normalisation, task.
        notes: what the user should know about how it was loaded (a damaged checkpoint skipped).
    """

    model: nn.Module
    data: Any
    name: str
    model_spec: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def load_source(
    source: str | Path,
    *,
    checkpoint: str | Path | None = None,
    data: str | Path | None = None,
    trust_code: bool = False,
) -> Source:
    """Load a trained model and its data from a run directory, or from a model spec.

    Args:
        source: a tightfit run directory (``config.yaml`` + ``summary.json`` with the best
            checkpoint), or a model spec (``builtin:digits-cnn``, ``hf:DIR``, ...).
        checkpoint: with a model spec: its weights (``model.safetensors`` or a checkpoint folder).
        data: with a model spec: a data YAML file (the ``data:`` section of a run config) or a
            source name (``digits``).
        trust_code: let a run directory's ``config.yaml`` name a ``module.path:callable`` model
            (``--trust-code``); a spec passed as ``source`` is the caller's own.

    Returns:
        The :class:`Source`.

    Raises:
        ConfigError: a missing run directory, checkpoint or data config.
    """
    from tightfit.data.build import build_datasets
    from tightfit.models.spec import build_model_for_data
    from tightfit.runs import checkpoint as checkpoint_files
    from tightfit.runs.model import build_run_model, load_run_model

    path = Path(source)
    if path.is_dir():
        config_file = path / "config.yaml"
        if not config_file.is_file():
            raise ConfigError(f"compress: {path} is not a tightfit run directory (no config.yaml)")
        from tightfit.config import load_config

        config = load_config(config_file, trust_code=trust_code)
        if config.lora is not None:
            raise ConfigError(f"compress: {path} is a LoRA run; merge the adapters first (tightfit lora merge)")
        bundle = build_datasets(config.data, seed=config.seed)
        spec, name, weights, notes = config.model, path.name, checkpoint, []
        if checkpoint is None:  # the best weights, or the newest intact checkpoint when best is damaged
            model, restored = load_run_model(
                path, config=config, num_classes=bundle.num_classes, input_shape=bundle.input_shape
            )
            notes = [f"skipped a damaged checkpoint: {problem}" for problem in restored.skipped]
            if restored.skipped:
                notes.append(f"compressing the weights of {restored.directory} instead")
        else:
            model, _ = build_run_model(config, num_classes=bundle.num_classes, input_shape=bundle.input_shape)
    else:
        if ":" not in str(source):
            raise ConfigError(
                f"compress: {source} is neither a run directory nor a model spec (builtin:NAME, hf:DIR, ...)"
            )
        if data is None:
            raise ConfigError("compress: with a model spec, give the data too (--data digits or --data data.yaml)")
        bundle = build_datasets(_data_config(data), seed=0)
        model, _ = build_model_for_data(str(source), {}, num_classes=bundle.num_classes, input_shape=bundle.input_shape)
        weights, spec, name, notes = checkpoint, str(source), str(source).split(":", 1)[1].replace("/", "-"), []
    if weights is not None:
        weights = Path(weights)
        if weights.is_dir():
            weights = weights / checkpoint_files.WEIGHTS_FILE
        if not weights.is_file():
            raise ConfigError(f"compress: checkpoint {weights} does not exist")
        checkpoint_files.load_weights(model, weights)
    metadata = {
        "model_spec": spec,
        "class_names": bundle.class_names,
        "input_shape": list(bundle.input_shape) if bundle.input_shape else None,
        "task": getattr(bundle, "task", None),
        "normalization": getattr(bundle, "metadata", {}).get("normalization"),
        "preprocessing": input_preprocessing(bundle),
    }
    return Source(model.cpu().eval(), bundle, name, spec, metadata, notes)


PREPROCESSING_SAMPLES = 256  # training samples the input statistics are taken over


def input_preprocessing(bundle) -> dict | None:
    """What ``predict`` must do to an image so the model sees what it was trained on, read from
    the training split: ``size`` and ``channels`` (C, H, W), the value ``range`` after the data's
    normalisation, the ``polarity`` (``light-on-dark`` when the background, the median value, is
    in the lower half of the range: digits are white strokes on black), the ``ink_extent`` (the
    median share of the frame the non-background pixels span; 1.0 for digits, centred and scaled
    to fill it) and the per-sample ``mean`` and ``std`` over up to 256 samples, against which an
    input far outside the training distribution is warned about. None for non-image data."""
    train = getattr(bundle, "train", None)
    shape = list(bundle.input_shape) if getattr(bundle, "input_shape", None) else None
    if train is None or not shape or len(shape) != 3 or len(train) == 0:
        return None
    count = min(len(train), PREPROCESSING_SAMPLES)
    images = torch.stack([torch.as_tensor(train[index][0], dtype=torch.float32) for index in range(count)])
    low, high = float(images.min()), float(images.max())
    background = images.flatten(1).median(dim=1).values
    light_on_dark = float(background.median()) < (low + high) / 2
    extents = [_ink_extent(image, float(level)) for image, level in zip(images, background)]
    means = images.flatten(1).mean(dim=1)
    return {
        "channels": shape[0],
        "size": shape[1:],
        "range": [low, high],
        "polarity": "light-on-dark" if light_on_dark else "dark-on-light",
        "ink_extent": float(np.median(extents)),
        "mean": float(means.mean()),
        "mean_spread": float(means.std()) if count > 1 else 0.0,
        "std": float(images.flatten(1).std(dim=1).mean()),
    }


def _ink_extent(image: torch.Tensor, background: float) -> float:
    """The larger side of the box around the pixels that differ from the background, over the frame's."""
    ink = (image - background).abs().amax(dim=0) > 0.25 * float((image - background).abs().max() or 1)
    rows, columns = torch.nonzero(ink.any(dim=1)).flatten(), torch.nonzero(ink.any(dim=0)).flatten()
    if len(rows) == 0:
        return 0.0
    return max((rows[-1] - rows[0] + 1) / ink.shape[0], (columns[-1] - columns[0] + 1) / ink.shape[1]).item()


def _data_config(data: str | Path):
    from tightfit.data.config import DataConfig
    from tightfit.settings import read_yaml

    path = Path(data)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"compress: data config {path} does not exist")
        tree = read_yaml(path)
        tree = tree.get("data", tree) if isinstance(tree, dict) else tree
        try:
            return DataConfig.model_validate(tree)
        except Exception as error:
            raise ConfigError(f"compress: data config {path}: {str(error).splitlines()[0]}") from None
    try:
        return DataConfig(source=str(data))
    except Exception:
        raise ConfigError(f"compress: --data {data!r} is neither a YAML file nor a data source name") from None


# --------------------------------------------------------------------------------- measuring
class Evaluator:
    """The held-out batches, prepared once, and the metric over them for torch and ONNX models."""

    def __init__(self, data: Any, *, batch_size: int = 256, latency_batch_size: int = 64) -> None:
        split_name, split = next(
            ((name, getattr(data, name, None)) for name in ("test", "val") if getattr(data, name, None) is not None),
            ("train", getattr(data, "train", None)),
        )
        if split is None or len(split) == 0:
            raise ConfigError("compress: the data has no held-out split to measure the metric on")
        loader = DataLoader(split, batch_size=batch_size, shuffle=False, collate_fn=getattr(data, "collate_fn", None))
        self.split = split_name
        self.batches = list(loader)
        self.samples = len(split)
        first = self.batches[0]
        self.example = slice_batch(first, 0, 1)
        self.large = slice_batch(first, 0, min(latency_batch_size, count_samples(first)))
        target = split_batch(first)[2]
        self.classification = target is not None and not target.is_floating_point()

    def metric_of(self, outputs: Iterable[Any]) -> Metric:
        """The metric from model outputs, one per held-out batch (in order)."""
        correct, loss_sum = 0, 0.0
        for output, batch in zip(outputs, self.batches):
            target = split_batch(batch)[2]
            logits = model_output_tensor(output)
            if self.classification and logits.ndim == 2:
                correct += int((logits.argmax(1) == target).sum())
            else:
                loss_sum += float(task_loss(output, target)) * count_samples(batch)
        if self.classification:
            return Metric("accuracy", 100.0 * correct / self.samples, True, self.split, self.samples)
        return Metric("loss", loss_sum / self.samples, False, self.split, self.samples)

    @torch.inference_mode()
    def torch_metric(self, model: nn.Module) -> Metric:
        model.eval()
        outputs = []
        for batch in self.batches:
            args, kwargs, _ = split_batch(batch)
            kwargs = {key: value for key, value in kwargs.items() if key != "labels"}
            outputs.append(model(*args, **kwargs))
        return self.metric_of(outputs)

    def onnx_metric(self, path: Path, threads: int | None) -> Metric:
        session = benchmark.ort_session(path, threads=threads)
        outputs = [torch.from_numpy(session.run(None, onnx_feeds(batch))[0]) for batch in self.batches]
        return self.metric_of(outputs)


@dataclass
class MeasureSettings:
    """How artifacts are timed (the same for all of them)."""

    threads: int
    warmup: int
    repeats: int


def measure_torch(
    name: str,
    step: str,
    model: nn.Module,
    directory: Path,
    evaluator: Evaluator,
    settings: MeasureSettings,
    *,
    metadata: dict[str, Any],
    program: bool = True,
) -> ArtifactRecord:
    """Save a PyTorch model (state dict, and a ``.pt2`` program when it exports) and measure it."""
    directory.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    weights = directory / "model.pt"
    torch.save(model.state_dict(), weights)
    details: dict[str, Any] = {}
    if program and not is_quantized(model):
        try:
            details["program"] = str(
                export_program(model, evaluator.example, directory / "model.pt2", metadata=metadata)
            )
        except ConfigError as error:
            details["program_error"] = str(error)
    size, gzipped = file_sizes(weights)
    parameters, nonzero = count_parameters(model)
    latency = {}
    for batch in (evaluator.example, evaluator.large):
        result = benchmark.measure_torch_latency(
            model,
            batch,
            threads=settings.threads,
            warmup=settings.warmup,
            repeats=settings.repeats,
            min_seconds=0.2,
        )
        latency[f"batch_{result.batch_size}"] = result.to_dict()
    metric = evaluator.torch_metric(model)
    return ArtifactRecord(
        name=name,
        step=step,
        format="pytorch",
        artifact=str(weights),
        size_bytes=size,
        gzip_bytes=gzipped,
        parameters=parameters,
        nonzero_parameters=nonzero,
        latency=latency,
        throughput=max(entry["throughput"] for entry in latency.values()),
        metric=metric.__dict__,
        details=details,
    )


def measure_onnx(
    name: str,
    step: str,
    path: Path,
    evaluator: Evaluator,
    settings: MeasureSettings,
    *,
    parameters: tuple[int, int] | None = None,
    details: dict[str, Any] | None = None,
) -> ArtifactRecord:
    """Measure an ONNX file under ONNX Runtime with the same batches and threads."""
    size, gzipped = file_sizes(path)
    latency = {}
    for batch in (evaluator.example, evaluator.large):
        result = benchmark.measure_onnx_latency(
            path,
            onnx_feeds(batch),
            threads=settings.threads,
            warmup=settings.warmup,
            repeats=settings.repeats,
            min_seconds=0.2,
        )
        latency[f"batch_{result.batch_size}"] = result.to_dict()
    metric = evaluator.onnx_metric(path, settings.threads)
    return ArtifactRecord(
        name=name,
        step=step,
        format="onnx",
        artifact=str(path),
        size_bytes=size,
        gzip_bytes=gzipped,
        parameters=parameters[0] if parameters else None,
        nonzero_parameters=parameters[1] if parameters else None,
        latency=latency,
        throughput=max(entry["throughput"] for entry in latency.values()),
        metric=metric.__dict__,
        details=details or {},
    )


# --------------------------------------------------------------------------------- the steps
def _settings(config: FinetuneConfig | None, recipe: Recipe) -> FinetuneSettings:
    chosen = config or recipe.finetune
    return FinetuneSettings(
        epochs=chosen.epochs,
        max_steps=chosen.max_steps,
        lr=chosen.lr,
        optimizer=chosen.optimizer,
        batch_size=chosen.batch_size,
        weight_decay=chosen.weight_decay,
        device=recipe.device,
        seed=recipe.seed,
    )


def _calibration(data: Any, batches: int, batch_size: int = 32) -> list[Any]:
    """Batches drawn (shuffled, seeded) from the training split: what the model will really see."""
    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(
        data.train,
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=getattr(data, "collate_fn", None),
    )
    calibration = []
    for batch in loader:
        if len(calibration) >= batches:
            break
        calibration.append(batch)
    return calibration


class Pipeline:
    """Runs a recipe on a source; see the module doc for the order of things."""

    def __init__(
        self,
        source: Source,
        recipe: Recipe,
        output: Path,
        *,
        console: Any = None,
        progress: bool = False,
        trust_code: bool = False,
    ) -> None:
        self.source = source
        self.trust_code = trust_code  # for a teacher run directory whose config.yaml names Python code
        self.recipe = recipe
        self.output = output
        self.console = console
        self.progress = progress
        self.records: list[ArtifactRecord] = []
        self.float_model: nn.Module | None = None  # the last model that is not int8 (for ONNX export)
        self.decisions: list[dict[str, Any]] = []  # steps that chose to change nothing, and why

    def say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text)

    def run(self) -> dict[str, Any]:
        recipe, source = self.recipe, self.source
        threads = recipe.threads or benchmark.default_threads()
        self.measure = MeasureSettings(threads, recipe.warmup, recipe.repeats)
        self.evaluator = Evaluator(source.data, latency_batch_size=recipe.latency_batch_size)
        int8 = benchmark.cpu_int8_support()
        if int8["warning"]:
            self.say(f"[yellow]warning:[/] {int8['warning']}")
        load_before = benchmark.machine_load()
        if load_before["busy"]:
            self.say(f"[yellow]warning:[/] {load_before['warning']}")
        for note in source.notes:
            self.say(f"[yellow]warning:[/] {note}")
        started = time.perf_counter()
        self.output.mkdir(parents=True, exist_ok=True)
        model = copy.deepcopy(source.model).cpu().eval()
        self.float_model = model
        self.say(
            f"measuring the original model ({plural(threads, 'thread')}, {self.evaluator.split} split: "
            f"{self.evaluator.samples} samples)"
        )
        self.records.append(self._measure_torch("original", "original", model, self.output / "00-original"))
        for index, step in enumerate(recipe.steps, start=1):
            directory = self.output / f"{index:02d}-{step.step}"
            self.say(f"step {index}/{len(recipe.steps)}: {step.step}")
            step_started = time.perf_counter()
            try:
                model = self._apply(step, model, directory, index)
            except BaseException:
                clean_directory(directory)
                raise
            for record in self.records:
                if record.step == f"{index:02d}-{step.step}" and not record.seconds:
                    record.seconds = round(time.perf_counter() - step_started, 2)
        compare(self.records, tolerance=recipe.tolerance)
        best = choose_best(self.records)
        context = {
            "source": source.name,
            "model_spec": source.model_spec,
            "recipe": recipe.model_dump(mode="json"),
            "threads": threads,
            "cpu": int8,
            "machine_load": {"before": load_before, "after": benchmark.machine_load()},
            "torch": torch.__version__,
            "metric": {
                "name": self.records[0].metric["name"],
                "split": self.evaluator.split,
                "samples": self.evaluator.samples,
                "tolerance": recipe.tolerance,
            },
            "decisions": self.decisions,
            "seconds": round(time.perf_counter() - started, 2),
        }
        path = write_report(self.output, self.records, best=best, context=context)
        from tightfit.report import write_report as write_page

        if self.console is not None:
            self.console.print(render_table(self.records, best))
            self.console.print(f"best: {best['why']}")
            self.console.print(f"report: {path}")
        try:
            page = write_page(path)
        except Exception as error:  # noqa: BLE001 - every artifact and report.json are written; say why the page is not
            page = f"not written ({error})"
        if self.console is not None:
            self.console.print(f"page: {page}")
        import json

        return json.loads(path.read_text())

    def _measure_torch(
        self, name: str, step: str, model: nn.Module, directory: Path, program: bool = True
    ) -> ArtifactRecord:
        return measure_torch(
            name, step, model, directory, self.evaluator, self.measure, metadata=self.source.metadata, program=program
        )

    def _apply(self, step: Any, model: nn.Module, directory: Path, index: int) -> nn.Module:
        """Run one step of the recipe through the registry of step kinds (:attr:`steps`)."""
        tag = f"{index:02d}-{step.step}"
        run = self.steps.get(step.step)
        if run is None:
            raise ConfigError(f"compress: unknown step {step!r}")
        return run(step, model, directory, tag)

    @property
    def steps(self) -> dict[str, Any]:
        """Each step kind of a recipe (the ``step:`` tag of ``compression/recipe.py``'s union) and the
        method that runs it; a new kind is a recipe model and one entry here."""
        return {
            "prune": self._step_prune,
            "finetune": self._step_finetune,
            "distill": self._step_distill,
            "qat": self._step_qat,
            "quantize": self._step_quantize,
            "export": self._step_export,
        }

    def _step_prune(self, step: PruneStep, model: nn.Module, directory: Path, tag: str) -> nn.Module:
        data = self.source.data
        model = copy.deepcopy(model).train()
        settings = _settings(step.finetune, self.recipe)
        schedule = None
        if step.method == "magnitude":
            planned = settings.planned_steps(len(data.train))
            end = step.end_step or max(step.begin_step + 1, (2 * planned) // 3)
            schedule = PolynomialSchedule(
                step.initial_sparsity,
                step.sparsity,
                step.begin_step,
                end,
                frequency=step.frequency or max(1, (end - step.begin_step) // 10),
            )
        # Tracing inputs for Torch-Pruning: several samples (BatchNorm in train mode cannot
        # normalise one), keyword inputs for HF-style models.
        args, kwargs, _ = split_batch(self.evaluator.large)
        kwargs = {key: value for key, value in kwargs.items() if key != "labels"}
        example_inputs = kwargs or (args[0] if len(args) == 1 else args)
        result = prune(
            model,
            data,
            method=step.method,
            sparsity=step.sparsity,
            scope=step.scope,
            schedule=schedule,
            exclude=step.exclude,
            example_inputs=example_inputs,
            num_classes=getattr(data, "num_classes", None),
            importance=step.importance,
            finetune=settings,
            run_dir=directory / "train",
            progress=self.progress,
        )
        record = self._measure_torch(f"{tag} {step.method} {step.sparsity:.0%}", tag, model, directory)
        record.details.update(result.details, sparsity_table=result.table)
        self.records.append(record)
        self.float_model = model
        return model

    def _step_finetune(self, step: FinetuneStep, model: nn.Module, directory: Path, tag: str) -> nn.Module:
        data = self.source.data
        from tightfit.compression.training import finetune

        model = copy.deepcopy(model).train()
        finetune(model, data, _settings(step, self.recipe), run_dir=directory / "train", progress=self.progress)
        self.records.append(self._measure_torch(tag, tag, model, directory))
        self.float_model = model
        return model

    def _step_distill(self, step: DistillStep, model: nn.Module, directory: Path, tag: str) -> nn.Module:
        data = self.source.data
        from tightfit.compression.distill import distill

        teacher = self._teacher(step)
        student = copy.deepcopy(model).train()
        distill(
            student,
            teacher,
            data,
            temperature=step.temperature,
            alpha=step.alpha,
            settings=_settings(step.finetune, self.recipe),
            run_dir=directory / "train",
            progress=self.progress,
        )
        record = self._measure_torch(f"{tag} T={step.temperature:g} a={step.alpha:g}", tag, student, directory)
        self.records.append(record)
        self.float_model = student
        return student

    def _step_qat(self, step: QatStep, model: nn.Module, directory: Path, tag: str) -> nn.Module:
        data = self.source.data
        from tightfit.compression.qat import qat

        args, _, _ = split_batch(self.evaluator.example)
        quantized = qat(
            model,
            data,
            args,
            settings=_settings(step.finetune, self.recipe),
            run_dir=directory / "train",
            progress=self.progress,
        )
        self.records.append(self._measure_torch(f"{tag} int8", tag, quantized, directory))
        return quantized

    def _step_quantize(self, step: QuantizeStep, model: nn.Module, directory: Path, tag: str) -> nn.Module:
        data = self.source.data
        if is_quantized(model):
            self.say("  quantize: the model is already int8 (after qat); nothing to do")
            return model
        result = quantize(
            model,
            step.method,
            example_batch=self.evaluator.example,
            calibration_batches=_calibration(data, step.calibration_batches),
            evaluate=lambda candidate: self.evaluator.torch_metric(candidate).value,
            higher_is_better=self.evaluator.classification,
            tolerance=self.recipe.tolerance,
            threads=self.measure.threads,
        )
        self.say(f"  quantize: {result.reason}")
        if result.method == "none":  # the model is unchanged: no new artifact to measure
            self.decisions.append(
                {
                    "step": tag,
                    "method": "none",
                    "reason": result.reason,
                    "candidates": result.candidates,
                    "warnings": result.warnings,
                }
            )
            return model
        record = self._measure_torch(f"{tag} {result.method}", tag, result.model, directory)
        record.details.update(
            method=result.method, reason=result.reason, candidates=result.candidates, warnings=result.warnings
        )
        self.records.append(record)
        return result.model

    def _step_export(self, step: ExportStep, model: nn.Module, directory: Path, tag: str) -> nn.Module:
        self._export(step, model, directory, tag)
        return model

    def _teacher(self, step: DistillStep) -> nn.Module:
        """The teacher: the source model, another run directory, or a model spec + weights."""
        if step.teacher == "original":
            return copy.deepcopy(self.source.model).eval()
        if Path(step.teacher).is_dir():
            return load_source(step.teacher, trust_code=self.trust_code).model
        from tightfit.models.spec import build_model
        from tightfit.runs import checkpoint as checkpoint_files

        if step.teacher_checkpoint is None or not Path(step.teacher_checkpoint).is_file():
            raise ConfigError(f"distill: teacher {step.teacher} needs teacher_checkpoint, an existing weights file")
        teacher = build_model(step.teacher, num_classes=getattr(self.source.data, "num_classes", None))
        checkpoint_files.load_weights(teacher, Path(step.teacher_checkpoint))
        return teacher.eval()

    def _export(self, step: ExportStep, model: nn.Module, directory: Path, tag: str) -> None:
        reference = self.float_model if is_quantized(model) else model
        if reference is not model:
            self.say(
                "  export: the current model is torch int8, which ONNX cannot hold; exporting the last float model "
                "and quantizing it with ONNX Runtime"
            )
        directory.mkdir(parents=True, exist_ok=True)
        verify_batches = self.evaluator.batches
        counts = count_parameters(reference)
        if step.program:
            try:
                export_program(
                    reference, self.evaluator.example, directory / "model.pt2", metadata=self.source.metadata
                )
            except ConfigError as error:
                self.say(f"  export: no .pt2 program ({error})")
        if not step.onnx:
            return
        fp32_path = export_onnx(
            reference, self.evaluator.example, directory / "model.onnx", metadata=self.source.metadata
        )
        check = verify_onnx(
            fp32_path,
            reference,
            verify_batches,
            max_abs_diff=step.max_abs_diff,
            min_top1_agreement=step.min_top1_agreement,
            threads=self.measure.threads,
        )
        self.records.append(
            measure_onnx(
                f"{tag} onnx fp32",
                tag,
                fp32_path,
                self.evaluator,
                self.measure,
                parameters=counts,
                details={"verification": check.to_dict()},
            )
        )
        method = step.int8
        if method == "auto":
            method = "static" if model_kind(reference) == "conv" else "dynamic"
        if method == "none":
            return
        int8_path = quantize_onnx(
            fp32_path,
            directory / "model.int8.onnx",
            method=method,
            calibration_feeds=[
                onnx_feeds(batch) for batch in _calibration(self.source.data, step.calibration_batches, batch_size=1)
            ],
        )
        try:
            check = verify_onnx(
                int8_path,
                reference,
                verify_batches,
                max_abs_diff=None,
                min_top1_agreement=step.int8_min_top1_agreement,
                threads=self.measure.threads,
            )
        except VerificationError as error:
            self.say(f"  [yellow]export: ONNX int8 not kept:[/] {error}")
            return
        self.records.append(
            measure_onnx(
                f"{tag} onnx int8 ({method})",
                tag,
                int8_path,
                self.evaluator,
                self.measure,
                parameters=counts,
                details={"verification": check.to_dict(), "method": method},
            )
        )


def compress(
    source: Source | str | Path,
    recipe: Recipe | dict | str | Path | None = None,
    output: str | Path | None = None,
    *,
    console: Any = None,
    progress: bool = False,
    overwrite: bool = False,
    trust_code: bool = False,
) -> dict[str, Any]:
    """Run a compression recipe on a trained model and return the report.

    Args:
        source: a :class:`Source`, a run directory or (with ``Source``) your own model and data.
        recipe: a :class:`Recipe`, a dict, a YAML path, or ``None`` (prune -> quantize -> export).
        output: the folder for artifacts and ``report.json`` (default: ``RUN_DIR/compressed``).
        console: a rich console for progress and the table (``None``: quiet).
        progress: show the trainer's progress bars during fine-tuning.
        overwrite: allow an output folder that already holds a report.
        trust_code: let files (a run's ``config.yaml``, the recipe, a teacher run) name
            ``module.path:callable`` models, which import and run Python code.

    Returns:
        The report (the content of ``report.json``).

    Raises:
        ConfigError: a bad recipe or source, or an output folder that would be overwritten.
    """
    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe, trust_code=trust_code)
    else:
        recipe = build_recipe(recipe)
    if not isinstance(source, Source):
        run_dir = Path(source)
        source = load_source(source, trust_code=trust_code)
        output = output or run_dir / "compressed"
    if output is None:
        raise ConfigError("compress: give an output folder")
    output = Path(output)
    if (output / "report.json").exists() and not overwrite:
        raise ConfigError(f"compress: {output} already holds a report; choose another --output or pass --overwrite")
    torch.manual_seed(recipe.seed)
    return Pipeline(source, recipe, output, console=console, progress=progress, trust_code=trust_code).run()
