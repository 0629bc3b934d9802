"""Model configurations shipped with tightfit (package data), for planning without downloads.

``llama-7b/config.json``: a Llama-2-7B-shaped decoder (32 layers, width 4096, 32000 tokens),
written for the project from the published architecture; build it with
``build_model("hf:" + str(config_dir("llama-7b")), meta=True)``.

``llama-134m/config.json``: the same architecture scaled down (12 layers, width 768), for the
plan-vs-measured figure of docs/lora.md (random weights, measured on a CPU).

``tiny-llama/``: a 0.9 M-parameter Llama (4 layers, width 128) with its own tokenizer
(``tokenizer.json``: byte-level BPE, 512 tokens, trained on the shipped corpora of
``tightfit/data/files``), for ``recipes/causal-lm-base.yaml`` and ``recipes/lora-causal-lm.yaml``.
"""

from pathlib import Path

CONFIGS_DIR = Path(__file__).resolve().parent


def config_dir(name: str) -> Path:
    """The directory of a shipped config, e.g. ``config_dir("llama-7b")``."""
    return CONFIGS_DIR / name
