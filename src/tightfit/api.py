"""``tightfit.train`` and ``tightfit.lr_find``: the one-call Python API of ``tightfit train`` and
``tightfit lr-find``, at the CLI's layer: it attaches the run's report (``training/`` does not import
``report/``) and builds the Trainer the range test runs on (``training/lr_finder`` does not import
the trainer).
"""

import shutil
import tempfile
from pathlib import Path
from typing import Any

from tightfit.config import TrainConfig, build_config, load_config
from tightfit.report.callback import report_callbacks
from tightfit.runs.run_folder import check_new_run_folder
from tightfit.training.lr_finder import LRFindResult, find_learning_rate, sweep_progress
from tightfit.training.trainer import Trainer


def train(
    config: TrainConfig | dict | str | Path | None = None,
    *,
    resume: str | Path | None = None,
    trust_code: bool = False,
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


def lr_find(config: Any, *, progress: bool = False) -> LRFindResult:
    """The range test on a recipe, without training it: ``tightfit lr-find`` from Python.

    A trainer is set up in a scratch run folder (removed afterwards) with its loggers and monitor
    off, the sweep runs with ``config.lr_find``'s settings, and nothing is kept.

    Args:
        config: a ``TrainConfig`` (or a dict of settings validated into one).
        progress: draw a progress bar.

    Returns:
        The :class:`~tightfit.training.lr_finder.LRFindResult`.

    Example:
        >>> result = tightfit.lr_find({"model": "builtin:mlp"})
        >>> result.suggestion
    """
    config = config if isinstance(config, TrainConfig) else build_config(config or {}, source="the Python config")
    scratch = Path(tempfile.mkdtemp(prefix="tightfit-lr-find-"))
    off = {"progress": False, "jsonl": False, "tensorboard": False, "mlflow": False, "report": False}
    config = config.model_copy(
        update={
            "run_dir": str(scratch / "run"),
            "logging": config.logging.model_copy(update={**off, "console": config.logging.console and progress}),
            "monitor": config.monitor.model_copy(update={"enabled": False}),
            "optimizer": config.optimizer.model_copy(
                update={"lr": config.lr_find.min_lr}
            ),  # not "auto": this is the search
        }
    )
    try:
        trainer = Trainer(config)
        trainer.setup()
        with sweep_progress(config.lr_find.num_steps, enabled=progress) as on_step:
            return find_learning_rate(trainer, **config.lr_find.model_dump(), on_step=on_step)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _as_yaml(value: Any) -> str:
    import json

    return json.dumps(value) if not isinstance(value, str) else value
