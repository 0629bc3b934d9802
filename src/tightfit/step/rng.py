"""Every random generator a training step may draw from: seed them, save them, put them back.

The saved form holds plain lists and tensors only, so a checkpoint stores it without pickle.
"""

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a run is repeatable."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The Python, NumPy and torch (CPU and CUDA) random states, as loadable-without-pickle data."""
    version, python_state, gaussian = random.getstate()
    bit_generator, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": [version, list(python_state), gaussian],
        "numpy": [bit_generator, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the random states saved by :func:`rng_state`."""
    version, python_state, gaussian = state["python"]
    random.setstate((version, tuple(python_state), gaussian))
    bit_generator, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((bit_generator, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
