"""Data: built-in digits, tensors, image folders, CSV tables, text, captioned images; splits, cache, transforms.

The entry point is :func:`build_datasets` (``DataConfig`` → ``DataBundle``); arrays already in
Python go through :func:`from_arrays`.

Names are imported on first use, so importing ``tightfit.data.config`` (as the run config does)
does not import torch: ``tightfit --help`` stays instant.
"""

import importlib

_EXPORTS = {
    "SOURCES": "tightfit.data.config",
    "DataConfig": "tightfit.data.config",
    "DataError": "tightfit.data.config",
    "parse_data_config": "tightfit.data.config",
    "DataBundle": "tightfit.data.build",
    "build_datasets": "tightfit.data.build",
    "make_dataloader": "tightfit.data.build",
    "from_arrays": "tightfit.data.tensors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tightfit.data' has no attribute {name!r}")
