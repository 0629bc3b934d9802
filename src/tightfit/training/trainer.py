"""The trainer: one recipe read top to bottom, one visible training step.

``Trainer(config).fit()`` builds what the configuration names (data, model, optimizer, schedule),
then runs the loop documented on :meth:`Trainer.fit`. Every feature that is not the step itself
(checkpoints, early stopping, the progress bar) is a callback; every feature of the step
(accumulation, precision, clipping, the numerics guard, out-of-memory recovery) is a setting.

Example (a notebook, with your own model and data sets):
    >>> trainer = Trainer({"epochs": 3, "optimizer": {"lr": 1e-3}}, model=my_model, datasets=(train, val, test))
    >>> summary = trainer.fit()
    >>> summary["test_accuracy"]
"""

import contextlib
import json
import math
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from tightfit.config import DEFAULT_MICRO_BATCH_SIZE, TrainConfig, build_config, config_to_yaml
from tightfit.errors import ConfigError, DistributedRunError, TightfitError
from tightfit.hardware.detect import resolve_device
from tightfit.memory.oom import is_out_of_memory
from tightfit.plan.distributed import fsdp_param_dtype
from tightfit.runs import checkpoint as checkpoint_files
from tightfit.runs.checkpoint_writer import CheckpointWriter
from tightfit.runs.run_folder import mark_run_folder
from tightfit.step.batch import count_samples, move_to_device
from tightfit.step.loss import batch_target, forward_and_loss
from tightfit.step.optim import build_optimizer, check_optimizer_device
from tightfit.step.precision import autocast, needs_grad_scaler, parameter_dtype, resolve_precision
from tightfit.step.rng import rng_state, seed_everything, set_rng_state
from tightfit.step.step import TrainingStep
from tightfit.training import distributed
from tightfit.training.callbacks import EarlyStopping, ModelCheckpoint, callback_states, load_callback_states
from tightfit.training.diagnosis import TrainingDiagnosis
from tightfit.training.distributed import setup_process, teardown_process
from tightfit.training.loggers import (
    ConsoleLogger,
    JsonlLogger,
    Logger,
    MLflowLogger,
    TensorBoardLogger,
    WandbLogger,
    flatten,
)
from tightfit.training.metrics import MetricAccumulator
from tightfit.training.monitor import ResourceMonitor
from tightfit.training.numerics import NumericsGuard
from tightfit.training.sampler import ResumableSampler
from tightfit.training.schedules import LRSchedule
from tightfit.units import plural

SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
LR_FIND_FILE = "lr_find.json"


def new_run_dir(root: str | Path = "runs") -> Path:
    """A fresh folder under ``root`` named after the time (``runs/20260101-120000``, ``-2`` if taken)."""
    stem = datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate = Path(root) / stem
    suffix = 2
    while candidate.exists():
        candidate = Path(root) / f"{stem}-{suffix}"
        suffix += 1
    return candidate


class Trainer:
    """Trains a model as a :class:`~tightfit.config.TrainConfig` describes.

    Args:
        config: a ``TrainConfig``, a dict of settings (validated into one) or None (the digits recipe).
        model: your own ``nn.Module``; default: built from ``config.model``.
        datasets: your own ``(train, val, test)`` data sets (val and test may be None) or a
            ``DataBundle``; default: built from ``config.data``.
        callbacks: extra callbacks (see :mod:`tightfit.training.callbacks`).
        loggers: replaces the loggers the ``logging:`` section would build.
    """

    def __init__(
        self,
        config: TrainConfig | Mapping[str, Any] | None = None,
        model: torch.nn.Module | None = None,
        datasets: Sequence[Dataset | None] | Any = None,
        callbacks: Sequence[Any] = (),
        loggers: Sequence[Logger] | None = None,
    ):
        self.config = (
            config if isinstance(config, TrainConfig) else build_config(config or {}, source="the Python config")
        )
        self.user_model = model
        self.user_datasets = datasets
        self.extra_callbacks = list(callbacks)
        self.user_loggers = loggers
        # counters; all of them go into the checkpoint so a resumed run continues exactly
        self.global_step = 0
        self.epoch = 0
        self.samples_in_epoch = 0  # this rank's samples already read in the current epoch
        self.epoch_finished = False
        self.samples_seen = 0
        self.wall_time_before_s = 0.0  # wall time of the earlier parts of a resumed run
        self.oom_recoveries = 0
        self._agreed = False  # this window's ranks agreed on out-of-memory (see _agreeing_after)
        self.batch_search_peak_bytes: int | None = None  # the step peak micro_batch_size=auto found, for the report
        self.should_stop = False
        self.stop_reason: str | None = None
        self.is_set_up = False
        self.fit_start_time: float | None = None

    # ------------------------------------------------------------------------------ setup
    def setup(self, resume_from: str | Path | None = None) -> None:
        """Build everything the run needs, in order: process, device, seed, run directory, data,
        model, precision, optimizer, schedule, callbacks, loggers; then restore a checkpoint.

        Raises:
            ConfigError: a setting that cannot be honoured here (device missing, no data...).
        """
        config = self.config
        self.process = setup_process(
            "cuda"
            if config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
            else "cpu",
            timeout_s=config.distributed.timeout_s,
        )
        self.device = resolve_device(
            config.device, local_rank=self.process.local_rank if self.process.distributed else None
        )
        self.strategy = distributed.resolve_strategy(config.distributed.strategy, self.process)
        # any rank's budget: every rank must average its gradients the same way
        budgeted = distributed.any_across_processes(config.budget is not None, self.device, self.process)
        self.gradient_sync = distributed.resolve_gradient_sync(config.distributed.gradient_sync, budgeted=budgeted)
        self.threads_before = torch.get_num_threads()
        if config.threads is not None:
            torch.set_num_threads(config.threads)  # restored when fit() ends: a notebook keeps its setting
        self.console = _console(config.logging.console and self.process.is_main)
        seed_everything(config.seed)

        # absolute: summary.json and the checkpoint state are read from other folders later
        self.run_dir = Path(
            resume_from or config.run_dir or distributed.broadcast_object(new_run_dir(), self.process)
        ).absolute()
        self.data = self._build_data()
        self.precision, precision_reason = resolve_precision(config.precision, self.device.type)
        self.model = self._build_model()
        self.console.print(f"precision: {self.precision} ({precision_reason})")
        self.precision_reason = precision_reason
        self._check_contract()
        self._apply_budget()
        micro_batch_size, self.accumulation_steps, self.effective_batch_size = self._batch_sizes()
        self.train_model = self._wrap_for_processes(self.model)  # before the optimizer: FSDP replaces the parameters
        settings = config.optimizer.model_dump(exclude={"name"})
        if settings["lr"] == "auto":
            settings["lr"] = config.lr_find.min_lr  # a placeholder until _find_learning_rate sets it
        check_optimizer_device(config.optimizer.name, self.device.type)
        self.optimizer = build_optimizer(config.optimizer.name, self.model.parameters(), **settings)
        scaler = torch.amp.GradScaler(self.device.type) if needs_grad_scaler(self.precision, self.device.type) else None
        self.guard = NumericsGuard(config.numerics.on_nonfinite, config.numerics.max_consecutive_skips)
        self.step = TrainingStep(
            self.train_model,
            self.optimizer,
            device=self.device,
            precision=self.precision,
            micro_batch_size=micro_batch_size,
            scaler=scaler,
            clip_grad_norm=config.clip_grad_norm,
            sync_context=self._sync_context if self.strategy != "single" else None,
            skip_check=self._check_numerics,
        )
        self.loaders = self._build_loaders()
        self.steps_per_epoch = len(self.loaders["train"])
        self.total_steps = self.config.epochs * self.steps_per_epoch
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.schedule = LRSchedule(
            self.optimizer, config.schedule, total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch
        )
        self.lr_find_result = None
        if config.optimizer.lr == "auto":
            self._find_learning_rate(resuming=resume_from is not None)
        self.callbacks = self._build_callbacks()
        self.checkpoint_writer = CheckpointWriter()
        if resume_from is not None:
            self._restore(Path(resume_from))
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)  # only now: a bad config has written nothing
        except OSError as error:
            raise ConfigError(f"run_dir: cannot create {self.run_dir} ({error.strerror})") from None
        if self.process.is_main:
            mark_run_folder(self.run_dir)
            checkpoint_files.remove_stale_temporaries(self.run_dir / "checkpoints")  # left by killed writes
        self.loggers = self._build_loggers() if self.process.is_main else []
        if self.process.is_main:
            (self.run_dir / CONFIG_FILE).write_text(config_to_yaml(config, self.run_dir))
            if self.lr_find_result is not None:
                _write_json_atomically(self.run_dir / LR_FIND_FILE, self.lr_find_result.to_dict())
            for logger in self.loggers:
                logger.log_params(flatten(config.model_dump(mode="json")))
        self.monitor = (
            ResourceMonitor(
                self.device, config.monitor.interval_s, config.monitor.warn_fraction, warn=self.console.print
            )
            if config.monitor.enabled
            else None
        )
        self.is_set_up = True

    def _build_data(self) -> dict[str, Dataset | None]:
        datasets = self.user_datasets
        if datasets is None:
            from tightfit.data.build import build_datasets

            datasets = build_datasets(self.config.data, seed=self.config.seed)
        self.data_task = getattr(datasets, "task", None)
        if hasattr(datasets, "train"):  # a DataBundle
            self.num_classes, self.collate_fn = datasets.num_classes, datasets.collate_fn
            self.input_shape = datasets.input_shape
            splits = {"train": datasets.train, "val": datasets.val, "test": datasets.test}
            if datasets.metadata.get("summary"):
                self.console.print(datasets.metadata["summary"])
        else:
            train, val, test = (list(datasets) + [None, None])[:3]
            self.num_classes, self.collate_fn, self.input_shape = None, None, None
            splits = {"train": train, "val": val, "test": test}
        if splits["train"] is None or len(splits["train"]) == 0:
            raise ConfigError("data: the training split is empty")
        return splits

    def _build_model(self) -> torch.nn.Module:
        config = self.config
        if self.user_model is not None:
            model = self.user_model
        else:
            from tightfit.runs.model import build_run_model

            model, inferred = build_run_model(config, num_classes=self.num_classes, input_shape=self.input_shape)
            if inferred:
                taken = ", ".join(f"{option}={value}" for option, value in inferred.items())
                self.console.print(f"model: {config.model} takes {taken} from the data")
        if self.data_task == "causal-lm":
            from tightfit.models.generate import require_causal_lm

            require_causal_lm(model, f"model {config.model if self.user_model is None else type(model).__name__}")
            if getattr(getattr(model, "config", None), "use_cache", False):
                model.config.use_cache = (
                    False  # training keeps keys and values for backward anyway; a cache only adds copies
                )
        from tightfit.models.prepare import prepare_model

        settings = preparation(config, self.precision, self.device, verbose=self.process.is_main)
        prepared = prepare_model(model, **settings)
        self.checkpointed_blocks = prepared.checkpointed_blocks
        if config.checkpointing.activation:
            blocks = self.checkpointed_blocks
            found = f"{len(blocks)} blocks ({', '.join(blocks[:3])}...)" if blocks else "no repeated blocks found"
            self.console.print(f"activation checkpointing: {found}")
        return prepared.module

    def _find_learning_rate(self, resuming: bool) -> None:
        """``optimizer.lr: auto``: the range test (``training/lr_finder.py``) on this run's own
        steps, everything put back afterwards; then the schedule is rebuilt at the chosen rate.
        A resumed run has its rate in the checkpoint and reads what the test found from the run."""
        from tightfit.training.lr_finder import LRFindResult, find_learning_rate, sweep_progress

        if resuming:
            sweep_file = self.run_dir / LR_FIND_FILE
            self.lr_find_result = LRFindResult(**json.loads(sweep_file.read_text())) if sweep_file.is_file() else None
            return

        settings = self.config.lr_find
        show = self.config.logging.progress and not self.console.quiet
        with sweep_progress(settings.num_steps, enabled=show) as on_step:
            result = find_learning_rate(self, **settings.model_dump(), on_step=on_step)
        if result.suggestion is None:
            raise ConfigError(
                f"optimizer.lr: auto found no rate: {result.reason}; set optimizer.lr to a number (see tightfit "
                "lr-find)"
            )
        for group in self.optimizer.param_groups:
            group["lr"] = result.suggestion
            group.pop("initial_lr", None)  # or the rebuilt schedule would keep the placeholder as its base
        self.schedule = LRSchedule(
            self.optimizer, self.config.schedule, total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch
        )
        self.lr_find_result = result
        self.console.print(
            f"optimizer.lr auto: {result.suggestion:.3g} ({result.reason}; range test of {len(result.lrs)} steps "
            f"from {result.min_lr:.2g} to {result.lrs[-1]:.2g})",
            soft_wrap=True,
            markup=False,
        )

    def _check_contract(self) -> None:
        """The model/data contract (``training/contract.py``): fail before the first step, not silently after it."""
        from tightfit.training.contract import check_model_data_contract, one_sample_batch

        name = self.config.model if self.user_model is None else type(self.user_model).__name__
        notes = check_model_data_contract(
            self.model,
            one_sample_batch(self.data["train"], self.collate_fn),
            model_name=name,
            num_classes=self.num_classes,
            precision=self.precision,
            device=self.device,
        )
        for note in notes:
            self.console.print(f"[yellow]model:[/] {note}")

    def _apply_budget(self) -> None:
        """A memory budget caps the CUDA allocator; on CPU the memory tracker enforces it per step."""
        self.budget_bytes = self.config.budget_bytes
        if self.budget_bytes is not None and self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.budget_bytes / total), self.device)

    def _batch_sizes(self) -> tuple[int, int, int]:
        """``(micro_batch_size, accumulation_steps, effective_batch_size)``, searching ``auto``.

        ``auto`` fits memory, it does not change what is trained (Lightning's and Composer's
        automatic batch alike): the effective batch stays the one the recipe states (or, with
        none stated, ``DEFAULT_MICRO_BATCH_SIZE x accumulation_steps``) and only its split into
        micro-batches and accumulation is searched. The line printed says which and why.
        """
        from tightfit.plan.search import micro_batch_dividing

        batch = self.config.batch
        train_size = len(self.data["train"])
        if batch.effective_batch_size is not None:
            effective, stated = batch.effective_batch_size, f"batch.effective_batch_size {batch.effective_batch_size}"
        elif batch.micro_batch_size == "auto":
            effective = DEFAULT_MICRO_BATCH_SIZE * batch.accumulation_steps
            stated = (
                f"none stated: the default micro-batch {DEFAULT_MICRO_BATCH_SIZE} x accumulation_steps "
                f"{batch.accumulation_steps}"
            )
        else:
            effective, stated = (
                batch.micro_batch_size * batch.accumulation_steps,
                "micro_batch_size x accumulation_steps",
            )
        # what the diagnosis names before it suspects the learning rate: a batch the recipe did not set
        self.batch_change = stated if batch.micro_batch_size == "auto" and batch.effective_batch_size is None else None
        if effective > train_size:
            stated += f", capped at the {train_size} training samples"
            effective = train_size
            self.batch_change = stated
        if batch.micro_batch_size == "auto":
            # each rank searches on its own; all take the smallest, so they step together
            fits = distributed.min_across_processes(self._find_micro_batch_size(effective), self.device, self.process)
            micro = micro_batch_dividing(effective, fits)
            divides = f", {micro} the largest that divides the effective batch" if micro != fits else ""
            why = (
                f"micro_batch_size auto: {fits} fits in memory (searched up to the effective batch){divides}; "
                f"effective batch from {stated}"
            )
        else:
            micro = min(batch.micro_batch_size, train_size)
            why = f"effective batch from {stated}"
        accumulation = math.ceil(effective / micro)
        self.batch_reason = why
        self.console.print(
            f"batch: micro {micro} x accumulation {accumulation} = effective {effective} ({why})",
            soft_wrap=True,
            markup=False,
        )
        return micro, accumulation, effective

    def _find_micro_batch_size(self, effective: int) -> int:
        """The largest micro-batch up to ``effective`` whose step, as this run takes it, fits: the run's
        precision, optimizer, clipping and accumulation (two micro-batches already reach the peak of k)."""
        from tightfit.plan import BatchSizeRequest, plan

        train = self.data["train"]
        accumulates = effective > 1
        collate = self.collate_fn or torch.utils.data.default_collate

        def batch_factory(batch_size: int, device: torch.device) -> Any:
            samples = [train[index % len(train)] for index in range(batch_size)]
            return move_to_device(collate(samples), device)

        budget_bytes = self.budget_bytes
        if budget_bytes is None and self.device.type == "cpu":
            import psutil

            budget_bytes = psutil.virtual_memory().available  # no budget given: what the machine has free
        result = plan(
            BatchSizeRequest(
                self.model,
                batch_factory,
                options=dict(
                    budget_bytes=budget_bytes,
                    device=self.device,
                    precision=self.precision,
                    optimizer=self.config.optimizer.name,
                    checkpointing=False,  # already applied to the model by _build_model
                    max_batch_size=max(1, effective),
                    accumulation_steps=2 if accumulates else 1,
                    clip_grad_norm=self.config.clip_grad_norm,
                ),
            )
        )
        self.console.print(
            f"micro_batch_size auto: {result.batch_size} fits (peak {result.peak_bytes / 2**20:.1f} MiB, "
            f"{plural(len(result.trials), 'trial step')})"
        )
        self.batch_search_peak_bytes = result.peak_bytes
        return result.batch_size

    def _build_loaders(self) -> dict[str, DataLoader | None]:
        from tightfit.data.build import make_dataloader

        loaders: dict[str, DataLoader | None] = {}
        for split, dataset in self.data.items():
            if dataset is None or len(dataset) == 0:
                loaders[split] = None
                continue
            training = split == "train"
            sampler = ResumableSampler(
                len(dataset),
                seed=self.config.seed,
                shuffle=training,
                rank=self.process.rank,
                world_size=self.process.world_size,
                pad=training,
            )
            loaders[split] = make_dataloader(
                dataset,
                self.config.data,
                # a training batch is a whole optimizer step's window; the step splits it into micro-batches
                batch_size=self.effective_batch_size if training else self.micro_batch_size,
                device_type=self.device.type,
                collate_fn=self.collate_fn,
                sampler=sampler,
                # a private generator: creating a loader iterator must not draw from the global RNG,
                # or a resumed run's dropout masks would differ from the uninterrupted run's
                generator=torch.Generator().manual_seed(self.config.seed),
            )
        return loaders

    def _wrap_for_processes(self, model: torch.nn.Module) -> torch.nn.Module:
        """Share the model across ranks as ``distributed.strategy`` says (in place; returns it)."""
        settings = self.config.distributed
        distributed.check_strategy(
            self.strategy, device_type=self.device.type, cpu_offload=settings.cpu_offload, precision=self.precision
        )
        if not self.process.distributed:
            return model
        if self.strategy == "ddp":
            self.console.print(
                f"distributed: ddp over {self.process.world_size} processes, gradients averaged {self.gradient_sync}"
            )
            if self.gradient_sync == "overlap":
                return distributed.wrap_data_parallel(model, self.device)
            distributed.replicate_model(model)
        elif self.strategy == "fsdp":
            from tightfit.models.checkpointing import find_repeated_blocks

            blocks = find_repeated_blocks(model)  # found again: LoRA's wrapper renames the modules
            param_dtype = fsdp_param_dtype(settings.param_dtype, self.precision, model)
            distributed.shard_model(
                model,
                blocks,
                param_dtype=param_dtype,
                reduce_dtype=settings.reduce_dtype,
                cpu_offload=settings.cpu_offload,
            )
            self.console.print(
                f"distributed: fsdp over {self.process.world_size} processes, {len(blocks)} blocks sharded as units "
                f"(parameters gathered in {param_dtype}, gradients reduced in {settings.reduce_dtype}"
                f"{', CPU offload' if settings.cpu_offload else ''})"
            )
        return model

    def _build_callbacks(self) -> list[Any]:
        config = self.config
        callbacks: list[Any] = []
        if config.early_stopping.enabled:
            stopping = config.early_stopping
            callbacks.append(EarlyStopping(stopping.monitor, stopping.mode, stopping.patience, stopping.min_delta))
        saving = config.checkpoint
        callbacks.append(
            ModelCheckpoint(
                saving.every_n_steps,
                saving.monitor,
                saving.mode,
                saving.keep_top_k,
                every_n_epochs=saving.every_n_epochs,
                keep_periodic=saving.keep_periodic,
            )
        )
        callbacks.append(
            TrainingDiagnosis(
                config.numerics.flat_loss_steps,
                self.schedule.warmup_steps,
                self.num_classes,
                warn=lambda line: self.console.print(line, soft_wrap=True, markup=False),
                batch_note=self.batch_change,
            )
        )
        if config.logging.progress and config.logging.console and self.process.is_main:
            from tightfit.training.progress import progress_callback

            callbacks.append(progress_callback(self.console))  # plain lines when stdout is not a terminal
        # A model may bring callbacks of its own (the diffusion module's validation images);
        # looked up on the class so PEFT's attribute forwarding does not report one twice.
        model_callbacks = [
            callback
            for module in self.model.modules()
            if hasattr(type(module), "training_callbacks")
            for callback in module.training_callbacks()
        ]
        # the caller's come last: a report (``tightfit.report.callback``) reads what the others wrote
        return callbacks + model_callbacks + self.extra_callbacks

    def _build_loggers(self) -> list[Logger]:
        if self.user_loggers is not None:
            return list(self.user_loggers)
        settings = self.config.logging
        loggers: list[Logger] = []
        if settings.console:
            loggers.append(ConsoleLogger(self.console))
        if settings.jsonl:
            loggers.append(JsonlLogger(self.run_dir / "metrics.jsonl"))
        if settings.tensorboard:
            loggers.append(TensorBoardLogger(self.run_dir / "tensorboard"))
        if settings.mlflow:
            uri = settings.mlflow_tracking_uri or (self.run_dir / "mlruns").resolve().as_uri()
            loggers.append(MLflowLogger(uri, settings.experiment, self.run_dir.name))
        if settings.wandb:
            loggers.append(WandbLogger(self.run_dir, settings.experiment, self.run_dir.name, mode=settings.wandb_mode))
        return loggers

    @property
    def base_lr(self) -> float:
        """The schedule's base learning rate (the chosen one under ``optimizer.lr: auto``)."""
        group = self.optimizer.param_groups[0]
        return group.get("initial_lr", group["lr"])

    @property
    def steps_in_epoch(self) -> int:
        """Optimizer steps already taken in the current epoch (non-zero after a mid-epoch resume)."""
        return math.ceil(self.samples_in_epoch / self.effective_batch_size)

    # ------------------------------------------------------------------------------ the loop
    def fit(self, resume_from: str | Path | None = None) -> dict[str, Any]:
        """Train, validate, test on the best checkpoint; returns the summary (also in summary.json).

        Args:
            resume_from: a run directory whose ``checkpoints/last`` to continue from exactly.

        The events fire in this order (``cb.on_x`` runs for every callback that has it)::

            on_fit_start
            for epoch in epochs:
                on_epoch_start(epoch)
                for window in train data (one window = one effective batch):
                    train_step(window)      # micro-batches: forward, backward; clip, guard, step
                    on_step_end(metrics)
                    [every eval_every_n_steps: evaluate("val"); on_validation_end(metrics)]
                evaluate("val"); on_validation_end(metrics)      # when there is a val split
                on_epoch_end(metrics)                            # ModelCheckpoint writes "last"
            evaluate("test") on the best checkpoint
            on_fit_end(summary)
            (on_exception(error) instead, if anything raised)
        """
        if not self.is_set_up:
            try:
                self.setup(resume_from)
            except BaseException:
                # a setup that fails after joining the process group still leaves it: a process
                # exiting with a live gloo group can abort in its C++ destructor
                if getattr(self, "process", None) is not None:
                    teardown_process(self.process)
                raise
        start_time = self.fit_start_time = time.perf_counter()
        succeeded = False
        try:
            with self.monitor or contextlib.nullcontext():
                self._fire("on_fit_start")
                self._train_epochs()
                summary = self._finish(start_time)
            self._fire("on_fit_end", summary)
            succeeded = True
            return summary
        except BaseException as error:
            self._fire("on_exception", error)
            lost = distributed.lost_peer_message(error, self.process)
            if lost is not None:
                raise DistributedRunError(
                    f"{lost}; continue from the last checkpoint with --resume {self.run_dir}"
                ) from error
            raise
        finally:
            for logger in self.loggers:
                logger.close()
            torch.set_num_threads(self.threads_before)
            try:
                self.checkpoint_writer.close()  # a write in flight when an error struck completes; joined
            finally:
                # last, after the writer thread has ended; on success a barrier first, so no rank
                # tears the group down and exits while another is still in a collective with it
                teardown_process(self.process, synchronize=succeeded)

    def _train_epochs(self) -> None:
        while self.epoch < self.config.epochs and not self._done():
            self.epoch_finished = False
            sampler = self.loaders["train"].sampler
            sampler.set_epoch(self.epoch, start_index=self.samples_in_epoch)
            # worker seeds come from the loader's generator: a function of the epoch, not of history
            self.loaders["train"].generator.manual_seed(self.config.seed + self.epoch)
            self._fire("on_epoch_start", self.epoch)
            self.model.train()
            window_start = time.perf_counter()
            for window in self.loaders["train"]:
                metrics = self.train_step(window)
                now = time.perf_counter()
                metrics["samples_per_s"] = metrics["samples"] * self.process.world_size / (now - window_start)
                window_start = now
                self._log_step(metrics)
                self._fire("on_step_end", metrics)
                if self.config.eval_every_n_steps and self.global_step % self.config.eval_every_n_steps == 0:
                    self._validate()
                    self.model.train()
                if self._done():
                    break
            if self.samples_in_epoch < sampler.start_index + len(sampler):
                # cut short mid-epoch: by max_steps (validate where it stopped) or by a callback
                # that has just validated; "last" is written by _finish, resumable mid-epoch
                if not self.should_stop:
                    self._validate()
                return
            epoch_metrics = {"epoch": self.epoch + 1, **self._validate()}
            self.epoch_finished = True
            self._fire("on_epoch_end", epoch_metrics)
            self.epoch += 1
            self.samples_in_epoch = 0

    def train_step(self, window: Any) -> dict[str, float]:
        """One optimizer step over a window of samples (the effective batch): :class:`TrainingStep`.

        An out-of-memory error halves the micro-batch (doubling the accumulation) and retries the
        same window; the effective batch does not change. Under a ``budget`` on CPU the memory
        tracker counts the whole step, ``optimizer.step`` included, as the estimate does.
        """
        while True:
            self._agreed = False
            try:
                with self._budget_context(window):
                    result = self.step(window)
                break
            except Exception as error:
                if isinstance(error, distributed.OutOfMemoryOnAnotherRank):
                    self._recover_from_out_of_memory(None)
                    continue
                if not is_out_of_memory(error):
                    raise
                self._tell_other_ranks_out_of_memory(error)
                self._recover_from_out_of_memory(error)
        if self.strategy == "ddp" and self.process.distributed:
            distributed.broadcast_buffers(self.model)  # BatchNorm statistics: rank 0's on every rank
        lr = self.optimizer.param_groups[0]["lr"]
        self.schedule.step()
        self.global_step += 1
        self.samples_in_epoch += result.samples
        self.samples_seen += result.samples
        loss = distributed.mean_across_processes(
            float(result.loss), self.device, self.process
        )  # over all ranks' samples
        return {
            "train_loss": loss,
            "lr": lr,
            "grad_norm": float(result.grad_norm),
            "samples": result.samples,
            "skipped": float(result.skipped is not None),
        }

    def _check_numerics(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> str | None:
        """The step's ``skip_check``: the numerics guard's verdict on the window's loss and gradients.

        The loss is averaged over ranks (the gradients already are), so every rank skips or steps alike."""
        loss, grad_norm = distributed.mean_across_processes(float(loss), self.device, self.process), float(grad_norm)
        if self.scaler is not None and math.isfinite(loss) and not math.isfinite(grad_norm):
            return None  # an fp16 gradient overflow is the scaler's business: it skips the step and rescales
        lr = self.optimizer.param_groups[0]["lr"]
        problem = self.guard.check(self.model, loss, grad_norm, lr=lr, clip_grad_norm=self.config.clip_grad_norm)
        if problem is not None:
            self.console.print(f"[yellow]step {self.global_step + 1} skipped:[/] {problem}")
        return problem

    def _sync_context(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        """The step's ``sync_context`` under several processes: FSDP reduce-scatters and DDP
        all-reduces during the last micro-batch's backward only; under ``ddp`` with
        ``after_accumulation``, after the last micro-batch's backward, the ranks agree (out of
        memory anywhere?) and average the gradients, before the step clips and checks them."""
        syncing = distributed.gradient_sync_context(self.train_model, last_micro_batch)
        agrees = self.strategy == "ddp" and self.gradient_sync == "after_accumulation" and self.process.distributed
        return self._agreeing_after(syncing) if last_micro_batch and agrees else syncing

    @contextlib.contextmanager
    def _agreeing_after(self, syncing: contextlib.AbstractContextManager):
        with syncing:
            yield
        # reached only when this rank's last backward succeeded; a rank that ran out of memory
        # before this point sends its True from train_step's handler into the same all-reduce
        self._agreed = True
        if distributed.any_across_processes(False, self.device, self.process):
            raise distributed.OutOfMemoryOnAnotherRank()
        distributed.average_gradients(self.model, self.device, self.process)

    @property
    def micro_batch_size(self) -> int:
        """Samples per forward/backward; out-of-memory recovery lowers it (the step's setting)."""
        return self.step.micro_batch_size

    @micro_batch_size.setter
    def micro_batch_size(self, value: int) -> None:
        self.step.micro_batch_size = value

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The fp16 loss scaler of the step (None unless fp16 on CUDA/MPS)."""
        return self.step.scaler

    @scaler.setter
    def scaler(self, value: torch.amp.GradScaler | None) -> None:
        self.step.scaler = value

    def _budget_context(self, window: Any):
        """On CPU a ``budget`` is enforced by the memory tracker, raising the same error a GPU would."""
        if self.budget_bytes is None or self.device.type != "cpu":
            return contextlib.nullcontext()
        from tightfit.memory.tracker import MemoryTracker

        return MemoryTracker(self.model, self.optimizer, budget_bytes=self.budget_bytes, host_data=window)

    def _tell_other_ranks_out_of_memory(self, error: BaseException) -> None:
        """This rank ran out of memory: join the all-reduce the other ranks wait in after their
        last micro-batch (:meth:`_agreeing_after`), so all of them shrink the micro-batch."""
        if not self.process.distributed:
            return
        if self.strategy == "fsdp" or self.gradient_sync == "overlap":
            # every FSDP forward and backward, and DDP's last backward, is a collective: the other
            # ranks wait in one this rank will not join, so there is no agreeing; the launcher
            # stops them when this rank exits
            where = "fsdp" if self.strategy == "fsdp" else "ddp with distributed.gradient_sync=overlap"
            raise DistributedRunError(
                f"rank {self.process.rank}: out of memory under {where}, where ranks cannot agree mid-step; continue "
                "with "
                f"--resume {self.run_dir} batch.micro_batch_size={max(1, self.micro_batch_size // 2)} "
                f"batch.effective_batch_size={self.effective_batch_size}"
                + (
                    " (or distributed.gradient_sync=after_accumulation, which recovers in place)"
                    if self.strategy == "ddp"
                    else ""
                )
            ) from error
        if self._agreed:  # past the agreement (in the optimizer step): the others have moved on
            raise DistributedRunError(
                f"rank {self.process.rank}: out of memory in the optimizer step, after the ranks agreed on the "
                f"window; lower batch.micro_batch_size and continue with --resume {self.run_dir}"
            ) from error
        distributed.any_across_processes(True, self.device, self.process)

    def _recover_from_out_of_memory(self, error: BaseException | None) -> None:
        """Halve the micro-batch, double the accumulation, drop the partial gradients.

        ``error`` is None on a rank that did not run out of memory itself but follows one that did."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        elif self.device.type == "mps":
            torch.mps.empty_cache()  # the freed blocks go back to unified memory, shared with the system
        if self.micro_batch_size == 1:
            if error is None:
                raise TightfitError(
                    "out of memory with a micro-batch of 1 on another rank: the model itself does not fit there"
                )
            raise TightfitError(
                "out of memory with a micro-batch of 1: the model itself does not fit "
                "(try checkpointing: auto, precision: bf16, optimizer.name: sgd, or lora)"
            ) from error
        self.micro_batch_size = max(1, self.micro_batch_size // 2)
        self.accumulation_steps = math.ceil(self.effective_batch_size / self.micro_batch_size)
        self.oom_recoveries += 1
        where = "" if not self.process.distributed else f" on {'this' if error is not None else 'another'} rank"
        self.console.print(
            f"[yellow]out of memory{where} at step {self.global_step + 1}:[/] micro_batch_size -> "
            f"{self.micro_batch_size}, "
            f"accumulation_steps -> {self.accumulation_steps} (effective batch {self.effective_batch_size} unchanged)"
        )

    def _validate(self) -> dict[str, float]:
        if self.loaders.get("val") is None:
            return {}
        metrics = self.evaluate("val")
        self.schedule.validated(metrics)
        self._log(metrics, "val")
        self._fire("on_validation_end", metrics)
        return metrics

    def _done(self) -> bool:
        return self.should_stop or (self.config.max_steps is not None and self.global_step >= self.config.max_steps)

    def evaluate(self, split: str = "val") -> dict[str, float]:
        """Loss and accuracy (top-k where it applies) over a split, under ``torch.inference_mode``.

        Returns:
            Metrics named ``{split}_loss``, ``{split}_accuracy``, ``{split}_top5_accuracy``.
        """
        loader = self.loaders.get(split)
        if loader is None:
            raise ConfigError(f"evaluate: the run has no {split!r} split")
        model = self.model
        was_training = model.training
        model.eval()
        metrics = MetricAccumulator()
        # under FSDP every forward is a collective: a rank with one batch fewer (ranks hold
        # len // world_size or one more samples) repeats its last batch without counting it
        extra_passes = self._batches_behind(len(loader)) if self.strategy == "fsdp" else 0
        with torch.inference_mode():
            for batch in loader:
                batch = move_to_device(batch, self.device, non_blocking=True)
                with autocast(self.precision, self.device.type):
                    output, loss = forward_and_loss(model, batch)
                metrics.update(output, batch_target(batch), loss, count_samples(batch))
            for _ in range(extra_passes):
                with autocast(self.precision, self.device.type):
                    forward_and_loss(model, batch)
        model.train(was_training)
        return metrics.compute(prefix=f"{split}_", device=self.device, process=self.process)

    def _batches_behind(self, batches: int) -> int:
        """How many batches this rank has fewer than the rank with the most."""
        most = -distributed.min_across_processes(-batches, self.device, self.process)
        return most - batches

    # ------------------------------------------------------------------------------ the end
    def _finish(self, start_time: float) -> dict[str, Any]:
        """Test on the best checkpoint, write the last checkpoint and the summary."""
        saver = next(callback for callback in self.callbacks if isinstance(callback, ModelCheckpoint))
        diagnosis = next(callback for callback in self.callbacks if isinstance(callback, TrainingDiagnosis))
        # this run's own best folder, not the path in the saver's state: a resumed run may have
        # been moved or copied, or written with a relative --run-dir from another folder
        best_path = self.run_dir / "checkpoints" / "best" if saver.best_path is not None else None
        if not self.epoch_finished:  # stopped by max_steps or a callback mid-epoch
            self.save_checkpoint("last")
        self.checkpoint_writer.wait()  # the best and last checkpoints are read back below
        test_metrics: dict[str, float] = {}
        restore_best = not self.config.early_stopping.enabled or self.config.early_stopping.restore_best
        if best_path is not None:
            self._barrier()
            self._load_weights(Path(best_path))
        if self.loaders.get("test") is not None:
            test_metrics = self.evaluate("test")
            self._log(test_metrics, "test")
        if best_path is not None and not restore_best:
            self._load_weights(self.run_dir / "checkpoints" / "last")
        if self.config.lora is not None:
            self._save_adapters()
        wall_time_s = self.wall_time_before_s + time.perf_counter() - start_time
        peaks = self._peak_memory_bytes_per_rank()
        summary = {
            "run_dir": str(self.run_dir),
            "model": self.config.model if self.user_model is None else type(self.user_model).__name__,
            **test_metrics,
            "best_metric": {"name": saver.monitor, "value": saver.best} if saver.best is not None else None,
            "best_checkpoint": str(best_path) if best_path else None,
            "last_checkpoint": str(self.run_dir / "checkpoints" / "last"),
            # without validation there is no best: the last checkpoint is the run's result
            "result_checkpoint": str(
                best_path if best_path and restore_best else self.run_dir / "checkpoints" / "last"
            ),
            "train_loss": diagnosis.recent_train_loss,
            "wall_time_s": round(wall_time_s, 3),
            "steps": self.global_step,
            "epochs": self.epoch,
            "samples_seen": self.samples_seen,
            "samples_per_s": round(self.samples_seen * self.process.world_size / max(wall_time_s, 1e-9), 1),
            "peak_memory_bytes": peaks[0],
            "peak_memory_bytes_per_rank": peaks,
            "device": str(self.device),
            "precision": self.precision,
            "precision_reason": self.precision_reason,
            "micro_batch_size": self.micro_batch_size,
            "accumulation_steps": self.accumulation_steps,
            "effective_batch_size": self.effective_batch_size,
            "batch_reason": self.batch_reason,
            "oom_recoveries": self.oom_recoveries,
            "batch_search_peak_bytes": self.batch_search_peak_bytes,
            "skipped_steps": self.guard.skipped_steps,
            "warnings": self.guard.warnings,
            "lr": self.base_lr,
            "lr_find": {
                "suggestion": self.lr_find_result.suggestion,
                "reason": self.lr_find_result.reason,
                "steps": len(self.lr_find_result.lrs),
            }
            if self.lr_find_result is not None
            else None,
            "diagnosis": diagnosis.conclude(base_lr=self.base_lr),
            "stop_reason": self.stop_reason,
            "world_size": self.process.world_size,
            "strategy": self.strategy,
            "gradient_sync": self.gradient_sync if self.strategy == "ddp" else None,
        }
        if self.process.is_main:
            _write_json_atomically(self.run_dir / SUMMARY_FILE, summary)
            for logger in self.loggers:
                if best_path is not None:
                    logger.log_artifact(Path(best_path))
        return summary

    def _peak_memory_bytes(self) -> dict[str, int]:
        peaks = {"process_rss": int(self.monitor.peak_rss_bytes) if self.monitor else None}
        if self.device.type == "cuda":
            peaks["cuda_allocated"] = int(torch.cuda.max_memory_allocated(self.device))
            peaks["cuda_reserved"] = int(torch.cuda.max_memory_reserved(self.device))
        return peaks

    def _peak_memory_bytes_per_rank(self) -> list[dict[str, int]]:
        """Every rank's peaks, by rank (one entry in a one-process run)."""
        mine = self._peak_memory_bytes()
        gathered = {
            name: distributed.gather_across_processes(value, self.device, self.process) for name, value in mine.items()
        }
        return [
            {name: None if values[rank] is None else int(values[rank]) for name, values in gathered.items()}
            for rank in range(self.process.world_size)
        ]

    # ------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(
        self, name: str, *, weights_only: bool = False, metrics: dict[str, float] | None = None
    ) -> Path:
        """Write ``RUN_DIR/checkpoints/NAME`` (rank 0 only); ``weights_only`` leaves out the
        optimizer and RNG state (best and top-k checkpoints, which are not resumed from)."""
        directory = self.run_dir / "checkpoints" / name
        if not self.process.is_main and not self.sharded_checkpoints:
            return directory
        meta = {
            "step": self.global_step,
            "epoch": self.epoch,
            "epoch_finished": self.epoch_finished,
            "metrics": metrics or {},
            "time": datetime.now().isoformat(timespec="seconds"),
        }
        state = {"counters": self._counters()} if weights_only else self._training_state()
        if self.sharded_checkpoints:
            from tightfit.runs.distributed_checkpoint import save_sharded_checkpoint

            state.pop("optimizer", None)  # in the shards
            optimizer = None if weights_only else self.optimizer
            return save_sharded_checkpoint(
                directory, self.model, optimizer, state, meta, self.process, trainable_only=self.config.lora is not None
            )
        weights = checkpoint_files.model_weights(self.model)  # adapters only for a LoRA run
        return self.checkpoint_writer.save(
            directory, weights, state, meta, checkpoint_files.weights_metadata(self.model)
        )

    @property
    def sharded_checkpoints(self) -> bool:
        """FSDP runs write DCP checkpoints (every rank its shards), loadable on any world size."""
        return self.strategy == "fsdp"

    def _load_weights(self, directory: Path) -> None:
        """Load a checkpoint's weights (not the training state) into the model."""
        if self.sharded_checkpoints:
            from tightfit.runs.distributed_checkpoint import load_sharded_checkpoint

            load_sharded_checkpoint(directory, self.model, trainable_only=self.config.lora is not None)
        else:
            checkpoint_files.load_weights(self.model, directory / checkpoint_files.WEIGHTS_FILE)

    def _save_adapters(self) -> None:
        """Write the LoRA adapters (rank 0); under FSDP they are gathered whole first (every rank)."""
        from tightfit.models.lora import save_adapters

        if self.strategy == "fsdp" and self.process.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
            state = get_model_state_dict(self.model, options=options)
            if self.process.is_main:
                save_adapters(self.model, self.run_dir / "adapters", state_dict=state)
        elif self.process.is_main:
            save_adapters(self.model, self.run_dir / "adapters")

    def _counters(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            # a finished epoch resumes at the start of the next one
            "epoch": self.epoch + 1 if self.epoch_finished else self.epoch,
            "samples_in_epoch": 0 if self.epoch_finished else self.samples_in_epoch,
            "samples_seen": self.samples_seen,
            "wall_time_s": self.wall_time_before_s
            + (time.perf_counter() - self.fit_start_time if self.fit_start_time else 0.0),
            "micro_batch_size": self.micro_batch_size,
            "oom_recoveries": self.oom_recoveries,
            "world_size": self.process.world_size,
        }

    def _training_state(self) -> dict[str, Any]:
        return {
            "counters": self._counters(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng_state(),
            "guard": self.guard.state_dict(),
            "callbacks": callback_states(self.callbacks),
        }

    def _restore(self, run_dir: Path) -> None:
        """Continue exactly from ``run_dir/checkpoints/last``: weights, optimizer, schedule,
        scaler, RNG, counters, callback state and the position in the epoch's data order.

        A damaged ``last`` is skipped for the newest intact checkpoint (``last.old``, ``best``,
        top-k), saying which file was damaged; from a weights-only one the run continues from its
        step with fresh optimizer state (see :meth:`_continue_from_weights`)."""
        if self.sharded_checkpoints:
            from tightfit.runs.distributed_checkpoint import load_sharded_checkpoint

            newest = next(
                (
                    folder
                    for folder in checkpoint_files.checkpoint_folders(run_dir / "checkpoints")
                    if checkpoint_files.holds_full_state(folder) and checkpoint_files.is_sharded(folder)
                ),
                run_dir / "checkpoints" / "last",
            )
            restored = load_sharded_checkpoint(
                newest, self.model, self.optimizer, trainable_only=self.config.lora is not None
            )
        else:
            restored = checkpoint_files.load_newest_intact(run_dir / "checkpoints", self.model, full_state_first=True)
        for problem in restored.skipped:
            self._warn(f"skipped a damaged checkpoint: {problem}")
        state = restored.state
        counters = state["counters"]
        self.global_step = counters["global_step"]
        self.epoch = counters["epoch"]
        # a rank's position in the epoch's order: rank r reads order[r::world], so after k samples
        # each, the first k x world of the order are read, whatever the world size resumes on
        self.samples_in_epoch = counters["samples_in_epoch"] * counters.get("world_size", 1) // self.process.world_size
        self.samples_seen = counters["samples_seen"]
        self.wall_time_before_s = counters["wall_time_s"]
        self.oom_recoveries = counters["oom_recoveries"]
        if counters["micro_batch_size"] < self.micro_batch_size:  # keep what out-of-memory recovery learnt
            self.micro_batch_size = counters["micro_batch_size"]
            self.accumulation_steps = math.ceil(self.effective_batch_size / self.micro_batch_size)
        if self.sharded_checkpoints:
            pass  # the optimizer state came with the weights, in the shards
        elif not restored.exact:
            self._continue_from_weights(restored)
            return
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.guard.load_state_dict(state["guard"])
        unclaimed = load_callback_states(self.callbacks, state["callbacks"])
        if unclaimed:
            self.console.print(f"resume: saved state of callbacks no longer in the run ignored: {', '.join(unclaimed)}")
        set_rng_state(state["rng"])
        self.console.print(
            f"resumed from {restored.directory} at step {self.global_step} (epoch {self.epoch + 1}, "
            f"{self.samples_in_epoch} samples in)"
        )

    def _continue_from_weights(self, restored: checkpoint_files.Restored) -> None:
        """Resume from a weights-only checkpoint (``best``, top-k) when no full-state one is intact: the
        counters and weights are its own, the schedule is moved to its step, and the optimizer's
        moments and the random streams start afresh, so the run is no longer bit-exact."""
        with warnings.catch_warnings():  # torch warns of a schedule stepped before the optimizer
            warnings.simplefilter("ignore")
            for _ in range(self.global_step):
                self.schedule.step()
        full_state = [
            folder.name
            for folder in checkpoint_files.checkpoint_folders(self.run_dir / "checkpoints")
            if checkpoint_files.holds_full_state(folder)
        ]
        found = f"{', '.join(full_state)} damaged, see above" if full_state else "the run stopped before writing one"
        self._warn(
            f"resumed from {restored.directory} (weights only) at step {self.global_step}: no intact checkpoint "
            f"holds the whole training state ({found}), so the optimizer state and random streams restart "
            "and the run will not match an uninterrupted one exactly"
        )

    # ------------------------------------------------------------------------------ plumbing
    def _warn(self, text: str) -> None:
        """A warning the user must see even with the console off (``--json``): on stderr, rank 0."""
        if self.process.is_main:
            print(f"tightfit: warning: {text}", file=sys.stderr)

    def _fire(self, event: str, *args: Any) -> None:
        for callback in self.callbacks:
            method = getattr(callback, event, None)
            if method is not None:
                method(self, *args)

    def _log_step(self, metrics: dict[str, float]) -> None:
        if self.global_step % self.config.logging.every_n_steps == 0 or self.global_step == 1:
            shown = {key: value for key, value in metrics.items() if key != "samples"}
            self._log({**shown, **(self.monitor.latest if self.monitor else {})}, "train")

    def _log(self, metrics: dict[str, float], stage: str) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step, stage=stage)

    def _barrier(self) -> None:
        if self.process.distributed:
            torch.distributed.barrier()


def preparation(config: TrainConfig, precision: str, device: torch.device, *, verbose: bool = False) -> dict[str, Any]:
    """The :func:`tightfit.models.prepare.prepare_model` settings of a run (its device and precision
    resolved): checkpointing, LoRA, parameter dtype, device. The trainer prepares its model with them."""
    return dict(
        checkpointing=config.checkpointing.activation,
        lora=config.lora,
        base_model=config.model,
        dtype=parameter_dtype(precision) if precision == "bf16-pure" else None,
        device=device,
        verbose=verbose,
        precision=precision,
    )


def _console(enabled: bool):
    from rich.console import Console

    # soft_wrap: a line longer than the width is not cut into two (off a terminal, rich's width is 80)
    return Console(highlight=False, quiet=not enabled, soft_wrap=True)


def _write_json_atomically(path: Path, payload: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    # strict JSON: a NaN test loss is written as null, not as a bare NaN no JSON parser accepts
    temporary.write_text(json.dumps(_finite_or_none(payload), indent=2, default=str, allow_nan=False))
    temporary.replace(path)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value
