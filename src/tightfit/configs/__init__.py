"""Model configurations shipped with tightfit (package data), for planning without downloads.

``llama-7b/config.json``: a Llama-2-7B-shaped decoder (32 layers, width 4096, 32000 tokens),
written for the project from the published architecture; build it with
``build_model("hf:" + str(config_dir("llama-7b")), meta=True)``.
"""

from pathlib import Path

CONFIGS_DIR = Path(__file__).resolve().parent


def config_dir(name: str) -> Path:
    """The directory of a shipped config, e.g. ``config_dir("llama-7b")``."""
    return CONFIGS_DIR / name
