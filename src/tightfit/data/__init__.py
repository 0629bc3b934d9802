"""Data: built-in digits, tensors, image folders, CSV tables, text, captioned images; splits, cache, transforms.

The entry point is :func:`build_datasets` (``DataConfig`` → ``DataBundle``); arrays already in
Python go through :func:`from_arrays`.
"""

from tightfit.data.build import DataBundle, build_datasets, make_dataloader
from tightfit.data.config import SOURCES, DataConfig, DataError, parse_data_config
from tightfit.data.tensors import from_arrays

__all__ = [
    "SOURCES",
    "DataBundle",
    "DataConfig",
    "DataError",
    "build_datasets",
    "from_arrays",
    "make_dataloader",
    "parse_data_config",
]
