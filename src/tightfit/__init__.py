"""tightfit: train, fine-tune and shrink PyTorch models on the hardware you actually have.

The package imports nothing heavy at start-up; ``tightfit.train`` and ``tightfit.Trainer``
are loaded on first use so that ``tightfit --help`` answers at once.
"""

__version__ = "0.1.0"

_LAZY = {
    "train": ("tightfit.api", "train"),
    "Trainer": ("tightfit.training.trainer", "Trainer"),
    "lr_find": ("tightfit.api", "lr_find"),
    "find_batch_size": ("tightfit.plan.search", "find_batch_size"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module_name, attribute = _LAZY[name]
        return getattr(importlib.import_module(module_name), attribute)
    raise AttributeError(f"module 'tightfit' has no attribute {name!r}")
