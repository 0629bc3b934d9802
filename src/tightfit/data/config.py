"""The ``data:`` section of a run configuration, and the errors the data layer raises.

:class:`DataConfig` is a pydantic model: the trainer embeds it in ``TrainConfig`` and validates
it together with the rest of the run. Fields that only make sense for one source say so in
their description; a field that a source does not use is ignored, not an error, so a recipe can
switch ``source`` without deleting keys.

Example:
    >>> from tightfit.data import DataConfig, build_datasets
    >>> bundle = build_datasets(DataConfig(source="digits", limit=200))
    >>> len(bundle.train), bundle.input_shape, bundle.num_classes
    (200, (1, 8, 8), 10)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from tightfit.errors import ConfigError, TightfitError
from tightfit.settings import describe_validation_error

SOURCES = ("digits", "image-folder", "csv", "tensors", "text-csv", "captioned-images", "text-corpus")
"""Every valid value of ``data.source``."""

Source = Literal[SOURCES]


class DataError(TightfitError):
    """The data itself is unusable: a corrupt image, a non-numeric cell, an empty split."""


class Columns(BaseModel, extra="forbid", allow_inf_nan=False):
    """Which columns (or arrays, in a tensors file) hold what.

    Every field defaults to ``None``, meaning the source's own default (given per field).
    """

    features: list[str] | None = Field(
        default=None, description="csv: feature columns (default: every column but the target)"
    )
    target: str | None = Field(
        default=None,
        description=(
            "csv: the target column (default: the last column); text-csv: the label column "
            "(default 'label'); tensors: the key of the targets array (default 'targets')"
        ),
    )
    text: str | None = Field(default=None, description="text-csv: the text column (default 'text')")
    inputs: str | None = Field(default=None, description="tensors: the key of the inputs array (default 'inputs')")


class DataConfig(BaseModel, extra="forbid", allow_inf_nan=False):
    """Where the data comes from and how it is split, cached, augmented and loaded.

    Attributes mirror the YAML keys of the ``data:`` section; see ``docs/data.md`` for examples
    of each source.
    """

    source: Source = Field(default="digits", description="one of: " + ", ".join(SOURCES))
    path: str | None = Field(
        default=None,
        description="file or folder of the data (every source but digits; tensors without a path "
        "only through the Python API tightfit.data.from_arrays)",
    )
    val_fraction: float = Field(
        default=0.15,
        ge=0.0,
        lt=1.0,
        description="share held out for validation when the data has no val split of its own",
    )
    test_fraction: float = Field(default=0.15, ge=0.0, lt=1.0, description="share held out for the final test")
    stratify: bool = Field(default=True, description="keep class proportions equal across splits (classification)")
    seed: int | None = Field(
        default=None,
        description="seed of the split and of limit; default: the run's seed. Pin it to keep the "
        "same test set while varying the training seed",
    )
    limit: int | None = Field(
        default=None, ge=1, description="use at most this many samples per split (a quick trial run)"
    )
    normalize: Literal["auto", "unit", "standard", "none"] = Field(
        default="auto",
        description="unit: pixels to [0, 1]; standard: zero mean, unit variance fitted on train; "
        "auto: standard for csv, unit for images (captioned-images always use [-1, 1])",
    )
    image_size: int | tuple[int, int] | None = Field(
        default=None,
        description="image-folder/captioned-images: resize (shorter side) and centre-crop to this "
        "size; default: the size of the first image",
    )
    color_mode: Literal["RGB", "L"] = Field(
        default="RGB", description="image-folder: RGB (3 channels) or L (greyscale, 1 channel)"
    )
    on_corrupt: Literal["error", "skip"] = Field(
        default="error", description="image sources: stop naming a corrupt file, or skip it with a warning"
    )
    augment: list[str] = Field(
        default_factory=list,
        description="train-only augmentations by name, e.g. [random-crop, hflip, 'rotation:15']",
    )
    cache: bool | str = Field(
        default=False,
        description="preprocessing cache: false, true (~/.cache/tightfit/data or $TIGHTFIT_CACHE_DIR), or a folder",
    )
    num_workers: int | Literal["auto"] = Field(
        default="auto", description="DataLoader worker processes; auto: 0 for in-memory data"
    )
    pin_memory: bool | Literal["auto"] = Field(
        default="auto", description="pin host memory for faster copies; auto: only with CUDA"
    )
    columns: Columns = Field(default_factory=Columns)
    task: Literal["auto", "classification", "regression"] = Field(
        default="auto", description="csv/tensors: what the target is; auto decides from its values"
    )
    tokenizer: str | None = Field(
        default=None,
        description="text-csv/captioned-images/text-corpus: a local Hugging Face tokenizer folder (or a "
        "diffusers pipeline folder with tokenizer/); text-csv default: the packaged MiniLM; text-corpus: required",
    )
    max_length: int | None = Field(
        default=None,
        ge=2,
        description="tokens per text; default 128 (text-csv), the "
        "tokenizer's limit (captioned-images), 256 tokens per packed row (text-corpus)",
    )
    packing: bool = Field(
        default=True, description="text-corpus: lay whole documents end to end into rows of max_length tokens"
    )
    overlong: Literal["truncate", "drop"] = Field(
        default="truncate", description="text-corpus: a document longer than max_length is cut, or left out"
    )

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_as_list(cls, value: Any) -> Any:
        # "augment: hflip" in YAML is one augmentation, not a list of characters.
        if isinstance(value, str):
            return [value]
        return value

    @field_validator("augment")
    @classmethod
    def _known_augmentations(cls, names: list[str]) -> list[str]:
        from tightfit.data.transforms import check_augmentation_name

        for name in names:
            check_augmentation_name(name)
        return names

    @field_validator("image_size")
    @classmethod
    def _positive_size(cls, size: int | tuple[int, int] | None) -> int | tuple[int, int] | None:
        sides = (size,) if isinstance(size, int) else (size or ())
        if any(side < 1 for side in sides):
            raise ValueError(f"image sides must be positive, got {size}")
        return size

    @field_validator("num_workers")
    @classmethod
    def _non_negative_workers(cls, workers: int | str) -> int | str:
        if isinstance(workers, int) and workers < 0:
            raise ValueError(f"num_workers must be 0 or more (or 'auto'), got {workers}")
        return workers

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} "
                "leaves no training data; their sum must be below 1"
            )
        return self


def parse_data_config(value: DataConfig | Mapping[str, Any] | None, where: str = "data") -> DataConfig:
    """Validate a ``data:`` mapping into a :class:`DataConfig`, with one-line errors.

    Args:
        value: a mapping (from YAML), an existing config (returned as is), or ``None`` (defaults).
        where: how the section is named in error messages.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: naming each bad key, what is valid, and the closest valid key.
    """
    if isinstance(value, DataConfig):
        return value
    if value is None:
        return DataConfig()
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping of data settings, got {type(value).__name__}")
    try:
        return DataConfig.model_validate(dict(value))
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, DataConfig, prefix=where)) from None
