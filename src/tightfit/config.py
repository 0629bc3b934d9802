"""The typed configuration of a training run, loaded from YAML with ``key=value`` overrides.

Every section is a pydantic model with ``extra="forbid"``: an unknown key, a wrong type or a bad
value is a :class:`~tightfit.errors.ConfigError` whose one line names the key, where it came from
(the file or the command line) and the closest valid key. The defaults are the built-in digits
recipe (``recipes/digits.yaml``), so ``TrainConfig()`` is a complete, working run.

Example:
    >>> config = load_config("recipes/digits.yaml", ["optimizer.lr=0.01", "epochs=5"])
    >>> config.optimizer.lr
    0.01
"""

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from tightfit.data.config import DataConfig
from tightfit.errors import ConfigError, SpecError
from tightfit.models.lora_config import LoRAConfig
from tightfit.names import (
    DEVICE_KINDS,
    GRADIENT_SYNCS,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULES,
    STRATEGIES,
    canonical_precision,
)
from tightfit.paths import anchor, relative_inside
from tightfit.settings import describe_validation_error, read_yaml
from tightfit.trust import check_spec_from_file
from tightfit.units import parse_memory

Mode = Literal["min", "max"]


class OptimizerConfig(BaseModel, extra="forbid", allow_inf_nan=False):
    """``optimizer:`` which optimizer and its hyper-parameters (see ``step/optim.py``)."""

    name: Literal[OPTIMIZERS] = "adamw"
    lr: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        default=3e-3, description="a rate, or auto: the learning-rate range test picks it at setup (lr_find:)"
    )
    weight_decay: float = Field(default=1e-4, ge=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)


class LRFindConfig(BaseModel, extra="forbid", allow_inf_nan=False):
    """``lr_find:`` the learning-rate range test of ``tightfit lr-find`` and ``optimizer.lr: auto``."""

    min_lr: float = Field(default=1e-7, gt=0, description="the sweep's first rate")
    max_lr: float = Field(default=1.0, gt=0, description="the sweep's last rate")
    num_steps: int = Field(default=100, ge=10, description="optimizer steps of the sweep")
    divergence: float = Field(
        default=4.0, gt=1, description="stop when the smoothed loss passes this multiple of its minimum"
    )

    @model_validator(mode="after")
    def _ordered(self) -> "LRFindConfig":
        if self.min_lr >= self.max_lr:
            raise ValueError(f"min_lr {self.min_lr} must be below max_lr {self.max_lr}")
        return self


class ScheduleConfig(BaseModel, extra="forbid", allow_inf_nan=False):
    """``schedule:`` the learning-rate schedule, stepped per optimizer step (``training/schedules.py``)."""

    name: Literal[SCHEDULES] = "cosine"
    warmup_steps: int | None = Field(default=None, ge=0, description="default: warmup_fraction of all steps")
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    min_lr_ratio: float = Field(
        default=0.0, ge=0, le=1, description="final lr / base lr for linear and cosine; the floor of reduce-on-plateau"
    )
    gamma: float = Field(default=0.5, gt=0, le=1, description="decay per step_size for exponential and step")
    step_size: int | None = Field(default=None, ge=1, description="optimizer steps per decay; default one epoch")
    monitor: str = Field(default="val_loss", description="reduce-on-plateau: the validation metric to watch")
    mode: Mode = "min"
    factor: float = Field(default=0.5, gt=0, lt=1, description="reduce-on-plateau: lr multiplier")
    patience: int = Field(default=2, ge=0, description="reduce-on-plateau: validations without improvement")


DEFAULT_MICRO_BATCH_SIZE = 64  # also the effective batch of micro_batch_size: auto when none is stated


class BatchConfig(BaseModel, extra="forbid", allow_inf_nan=False):
    """``batch:`` samples per forward pass (micro-batch), and per optimizer step (effective batch).

    ``effective_batch_size = micro_batch_size * accumulation_steps`` unless set; when it is set,
    the accumulation follows from it (the last micro-batch of a window may be smaller).
    """

    micro_batch_size: int | Literal["auto"] = Field(
        default=DEFAULT_MICRO_BATCH_SIZE,
        description="an integer, or auto (the largest that fits and divides the effective batch; the rest accumulates)",
    )
    accumulation_steps: int = Field(default=1, ge=1)
    effective_batch_size: int | None = Field(default=None, ge=1)

    @field_validator("micro_batch_size")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"must be a positive integer or 'auto', got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "BatchConfig":
        if (
            self.effective_batch_size is not None
            and self.accumulation_steps != 1
            and isinstance(self.micro_batch_size, int)
            and self.micro_batch_size * self.accumulation_steps != self.effective_batch_size
        ):
            raise ValueError(
                f"micro_batch_size {self.micro_batch_size} x accumulation_steps {self.accumulation_steps} "
                f"!= effective_batch_size {self.effective_batch_size}; set two of the three"
            )
        return self


class ActivationCheckpointingConfig(BaseModel, extra="forbid", allow_inf_nan=False):
    """``checkpointing:`` activation (gradient) checkpointing: recompute instead of storing."""

    activation: bool | Literal["auto"] | list[str] = Field(
        default=False, description="false, auto (the model's repeated blocks) or module names"
    )


class CheckpointConfig(BaseModel, extra="forbid", allow_inf_nan=False):
    """``checkpoint:`` which checkpoint files the run writes (``last`` always, ``best`` with validation)."""

    every_n_steps: int | None = Field(
        default=None, ge=1, description="also write a kept, resumable step-N every N optimizer steps"
    )
    every_n_epochs: int | None = Field(
        default=None, ge=1, description="also write a kept, resumable epoch-N every N epochs"
    )
    keep_periodic: int | None = Field(
        default=None, ge=1, description="how many step-N/epoch-N checkpoints to keep (default: all)"
    )
    keep_top_k: int = Field(default=0, ge=0, description="keep the k best checkpoints by monitor under top-k/")
    monitor: str = "val_loss"
    mode: Mode = "min"


class EarlyStoppingConfig(BaseModel, extra="forbid", allow_inf_nan=False):
    """``early_stopping:`` stop when the monitored metric stalls."""

    enabled: bool = False
    monitor: str = "val_loss"
    mode: Mode = "min"
    patience: int = Field(default=5, ge=1)
    min_delta: float = Field(default=0.0, ge=0)
    restore_best: bool = Field(default=True, description="end with the best weights instead of the last")


class LoggingConfig(BaseModel, extra="forbid", allow_inf_nan=False):
    """``logging:`` where metrics go (console, JSON lines, TensorBoard, MLflow, W&B)."""

    console: bool = True
    progress: bool = Field(
        default=True,
        description="rich progress bars in a terminal; plain lines (every 30 s and per epoch) when not one",
    )
    jsonl: bool = True
    tensorboard: bool = True
    mlflow: bool = False
    mlflow_tracking_uri: str | None = Field(default=None, description="default: a file store in RUN_DIR/mlruns")
    wandb: bool = Field(
        default=False, description="Weights & Biases (pip install 'tightfit[wandb]'); offline: RUN_DIR/wandb"
    )
    wandb_mode: Literal["offline", "online", "disabled"] = Field(
        default="offline", description="wandb.init(mode=...); offline sends nothing"
    )
    experiment: str = Field(default="tightfit", description="the MLflow experiment and the W&B project")
    every_n_steps: int = Field(default=10, ge=1, description="log training metrics every N optimizer steps")
    report: bool = Field(default=True, description="write RUN_DIR/report.html when the run ends (tightfit report)")


class MonitorConfig(BaseModel, extra="forbid", allow_inf_nan=False):
    """``monitor:`` the background sampler of process and device memory."""

    enabled: bool = True
    interval_s: float = Field(default=0.5, gt=0)
    warn_fraction: float = Field(default=0.9, gt=0, le=1, description="warn when memory in use passes this share")


class NumericsConfig(BaseModel, extra="forbid", allow_inf_nan=False):
    """``numerics:`` what to do when the loss or the gradients stop being finite, and when the loss does not move."""

    on_nonfinite: Literal["skip", "stop"] = "skip"
    max_consecutive_skips: int = Field(default=10, ge=1)
    flat_loss_steps: int | None = Field(
        default=100,
        ge=20,
        description="warn when the loss has not moved, against its noise, in the first N steps after warm-up (null: "
        "off)",
    )


class DistributedConfig(BaseModel, extra="forbid"):
    """``distributed:`` how several processes (``torchrun``) share the work (docs/distributed.md).

    In one process ``fsdp`` has nothing to shard and trains the whole model, but still writes
    sharded (DCP) checkpoints, so the run resumes on any number of processes.
    """

    strategy: Literal[("auto", *STRATEGIES)] = Field(
        default="auto",
        description="auto: DDP when launched with several processes; fsdp: shard parameters, gradients, optimizer "
        "state",
    )
    gradient_sync: Literal[("auto", *GRADIENT_SYNCS)] = Field(
        default="auto",
        description="ddp: overlap (DistributedDataParallel, communication during backward) or after_accumulation "
        "(averaged after the micro-batches: out-of-memory recovery across ranks); auto: after_accumulation under a "
        "budget",
    )
    param_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto", description="fsdp: dtype of the gathered parameters in forward/backward; auto follows precision"
    )
    reduce_dtype: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32", description="fsdp: dtype gradients are reduced in"
    )
    cpu_offload: bool = Field(
        default=False, description="fsdp: keep sharded parameters, gradients and optimizer state in CPU memory"
    )
    timeout_s: float = Field(
        default=600, gt=0, description="a collective waiting longer than this ends every rank with an error"
    )


class TrainConfig(BaseModel, extra="forbid", allow_inf_nan=False):
    """A whole training run. The defaults are the digits recipe."""

    model: str = Field(
        default="builtin:digits-cnn", description="builtin:NAME, torchvision:NAME, hf:DIR, module:callable"
    )
    model_options: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of the model's constructor"
    )
    init_weights: str | None = Field(
        default=None,
        description="start from these weights: a run directory (its best, else last checkpoint), a checkpoint folder "
        "or a .safetensors file",
    )
    data: DataConfig = Field(default_factory=DataConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    lr_find: LRFindConfig = Field(default_factory=LRFindConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    precision: Literal[("auto", *PRECISIONS)] = "auto"
    batch: BatchConfig = Field(default_factory=BatchConfig)
    checkpointing: ActivationCheckpointingConfig = Field(default_factory=ActivationCheckpointingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    numerics: NumericsConfig = Field(default_factory=NumericsConfig)
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:N or mps")
    budget: str | int | None = Field(default=None, description="memory budget, e.g. 6GiB (simulated on CPU)")
    threads: int | None = Field(
        default=None, ge=1, description="CPU threads for torch's intra-op parallelism; default: torch's (one per core)"
    )
    seed: int = 0
    run_dir: str | None = Field(default=None, description="default: a new folder under runs/")
    epochs: int = Field(default=12, ge=1)
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many optimizer steps")
    eval_every_n_steps: int | None = Field(default=None, ge=1, description="validate mid-epoch too")
    clip_grad_norm: float | None = Field(default=None, gt=0)
    lora: LoRAConfig | None = None
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @field_validator("checkpointing", mode="before")
    @classmethod
    def _checkpointing_shorthand(cls, value: Any) -> Any:
        # "checkpointing: auto" is the natural way to write it; it means the activation setting.
        return (
            value
            if isinstance(value, Mapping) or isinstance(value, ActivationCheckpointingConfig)
            else {"activation": value}
        )

    @field_validator("precision", mode="before")
    @classmethod
    def _lightning_precision_names(cls, value: Any) -> Any:
        # "bf16-mixed", "16-mixed", "32-true", "bf16-true": Lightning's spelling of the same choices
        return canonical_precision(value) if isinstance(value, (str, int)) else value

    @field_validator("budget")
    @classmethod
    def _budget_parses(cls, value: str | int | None) -> str | int | None:
        if value is not None:
            try:
                parse_memory(value, where="budget")
            except SpecError as error:
                raise ValueError(str(error).removeprefix("budget: ")) from None
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        kind = value.split(":")[0]
        if kind not in DEVICE_KINDS or (":" in value and not value.split(":")[1].isdigit()):
            raise ValueError(f"unknown device {value!r} (auto, cpu, cuda, cuda:N or mps)")
        return value

    @property
    def budget_bytes(self) -> int | None:
        """The memory budget in bytes, or None."""
        return None if self.budget is None else parse_memory(self.budget, where="budget")


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key.sub=value`` into the dotted key and the value read as YAML (``0.1``, ``true``, ``[a, b]``)."""
    if "=" not in text or text.startswith("="):
        raise ConfigError(f"override {text!r}: expected key=value, e.g. optimizer.lr=0.01")
    key, raw_value = text.split("=", 1)
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else None
    except yaml.YAMLError:
        value = raw_value
    return key.strip(), value


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None or not isinstance(child, dict):
            if child is not None:
                raise ConfigError(f"override {key}: {'.'.join(parts[: depth + 1])} is a value, not a section")
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


PATH_SETTINGS = ("model", "init_weights", "run_dir", "data.path", "data.tokenizer", "data.cache")
"""Settings that hold a path (``model`` only after ``hf:`` or ``diffusion:``); see :mod:`tightfit.paths`."""
MODEL_FOLDER_PREFIXES = ("hf:", "diffusion:")
_MAY_BE_HUB_ID = ("model", "data.tokenizer")  # a Hugging Face repo id, resolved from the local hub cache


def _convert_path(key: str, value: Any, convert) -> Any:
    """``convert(path, key)`` applied to the path in one setting's value (the folder of a model spec)."""
    if not isinstance(value, str) or not value:
        return value
    if key == "model":
        prefix = next((prefix for prefix in MODEL_FOLDER_PREFIXES if value.startswith(prefix)), None)
        return value if prefix is None else prefix + convert(value.removeprefix(prefix), key)
    return convert(value, key)


def map_paths(tree: Mapping[str, Any], convert) -> dict[str, Any]:
    """A copy of a config tree with ``convert(path, key)`` applied to every path setting."""
    tree = dict(tree)
    for key in PATH_SETTINGS:
        section, _, name = key.rpartition(".")
        node = tree if not section else tree.get(section)
        if not isinstance(node, Mapping) or name not in node:
            continue
        if section:
            node = tree[section] = dict(node)
        node[name] = _convert_path(key, node[name], convert)
    return tree


def anchor_paths(tree: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """A config tree with its relative paths made absolute against ``base`` (the file's folder)."""
    return map_paths(tree, lambda path, key: anchor(path, base, may_be_hub_id=key in _MAY_BE_HUB_ID))


def _anchor_override(text: str, base: Path) -> str:
    """A ``key=value`` override with a relative path value made absolute against ``base``."""
    key, value = parse_override(text)
    if key not in PATH_SETTINGS or not isinstance(value, str):
        return text
    anchored = _convert_path(key, value, lambda path, key: anchor(path, base, may_be_hub_id=key in _MAY_BE_HUB_ID))
    return text if anchored == value else f"{key}={json.dumps(anchored)}"


def build_config(tree: Mapping[str, Any], *, source: str = "the defaults", overrides: list[str] = ()) -> TrainConfig:
    """Validate a config mapping with ``key=value`` overrides applied.

    Raises:
        ConfigError: naming each bad key, where it was set and the closest valid key.
    """
    tree = dict(tree)
    overridden = set()
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
        overridden.add(key)
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as error:

        def where(key: str) -> str:
            from_command_line = any(
                key == set_key or key.startswith(set_key + ".") or set_key.startswith(key + ".")
                for set_key in overridden
            )
            return " (on the command line)" if from_command_line else f" (in {source})"

        raise ConfigError(describe_validation_error(error, TrainConfig, where=where)) from None


def load_config(path: str | Path | None, overrides: list[str] = (), *, trust_code: bool = False) -> TrainConfig:
    """Load a run configuration: a YAML file (or the digits defaults when None) plus overrides.

    Args:
        path: a YAML file, or None for the built-in digits recipe.
        overrides: ``key=value`` strings, dotted for nested keys (``optimizer.lr=0.01``).
        trust_code: let the file's ``model`` be a ``module.path:callable`` spec, which imports
            and runs Python code (``--trust-code``); a spec given as an override is the user's
            own and needs no opt-in.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: for a missing or malformed file, an unknown key, a wrong type or a bad value,
            or a Python-callable model spec in the file without ``trust_code``.
    """
    # a path in the file is relative to the file, one on the command line to the current folder
    overrides = [_anchor_override(text, Path.cwd()) for text in overrides]
    if path is None:
        return build_config({}, overrides=overrides)
    tree = anchor_paths(read_yaml(path), Path(path).expanduser().absolute().parent)
    config = build_config(tree, source=str(path), overrides=overrides)
    if config.model == tree.get("model"):  # the file chose the model, not the command line
        check_spec_from_file(config.model, where=f"{path}: model", trust_code=trust_code)
    return config


def default_recipe() -> Path:
    """The digits recipe: ``recipes/digits.yaml`` of a source checkout, else the copy shipped
    inside the package (``tightfit/recipes/digits.yaml``; tests check the two are identical)."""
    checkout = Path(__file__).resolve().parents[2] / "recipes" / "digits.yaml"
    return checkout if checkout.is_file() else Path(__file__).resolve().parent / "recipes" / "digits.yaml"


def config_to_yaml(config: TrainConfig, folder: Path | None = None) -> str:
    """The resolved configuration as YAML, every default filled in (saved next to every run).

    ``folder``: where the file goes; paths inside it are written relative to it (``run_dir: .``),
    so the folder can move and :func:`load_config` still finds them.
    """
    tree = config.model_dump(mode="json")
    if folder is not None:
        tree = map_paths(tree, lambda path, key: relative_inside(path, folder))
    return yaml.safe_dump(tree, sort_keys=False)
