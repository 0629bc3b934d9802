"""``tightfit.train``: the one-call Python API of ``tightfit train``, at the CLI's layer (it attaches the
run's report, which ``training/`` does not import)."""

from pathlib import Path
from typing import Any

from tightfit.config import TrainConfig, build_config, load_config
from tightfit.report.callback import report_callbacks
from tightfit.runs.run_folder import check_new_run_folder
from tightfit.training.trainer import Trainer


def train(
    config: TrainConfig | dict | str | Path | None = None, *, resume: str | Path | None = None, trust_code: bool = False,
    **overrides: Any,
) -> dict:
    """Train as ``config`` says and return the summary (also written to ``RUN_DIR/summary.json``).

    Args:
        config: a ``TrainConfig``, a dict of settings, a YAML file path, or None (the digits recipe).
        resume: a run directory to continue exactly from its last checkpoint.
        trust_code: let a YAML file name a ``module.path:callable`` model (it runs Python code).
        **overrides: settings replacing the config's, by dotted key with ``__`` for the dot
            (``optimizer__lr=0.01``) or by top-level name (``epochs=3``).

    Returns:
        The run's summary: ``test_accuracy``, ``test_loss``, ``best_metric``, ``best_checkpoint``,
        ``wall_time_s``, ``steps``, ``peak_memory_bytes``, ``run_dir`` and more.

    Raises:
        ConfigError: an unknown key, a wrong type or a bad value, naming the key; or a
            ``run_dir`` that holds a run (pass ``resume``) or files of the user's.

    Example:
        >>> summary = tightfit.train(epochs=3, run_dir="runs/quick")
        >>> summary["test_accuracy"]
    """
    override_strings = [f"{key.replace('__', '.')}={_as_yaml(value)}" for key, value in overrides.items()]
    if isinstance(config, (str, Path)):
        config = load_config(config, override_strings, trust_code=trust_code)
    elif isinstance(config, TrainConfig):
        config = build_config(config.model_dump(mode="json"), source="the Python config", overrides=override_strings)
    else:
        config = build_config(config or {}, source="the Python config", overrides=override_strings)
    if resume is None and config.run_dir:
        check_new_run_folder(config.run_dir)  # never write over a run or a folder of the user's
    return Trainer(config, callbacks=report_callbacks(config)).fit(resume_from=resume)


def _as_yaml(value: Any) -> str:
    import json

    return json.dumps(value) if not isinstance(value, str) else value
