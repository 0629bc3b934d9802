"""The run folder a new run may be written into, and the mark that says a folder is a run.

A fresh ``tightfit train --run-dir DIR`` may write into ``DIR`` when it does not exist, is empty,
or is a run that was stopped before its first complete checkpoint (it carries :data:`RUN_MARKER`,
written by the trainer as soon as the folder is made). Anything else is refused with one line:
a file, a folder that cannot be written, a folder holding a run to ``--resume``, or a folder of
the user's own (a ``config.yaml`` or ``summary.json`` there is never overwritten).
"""

import os
from pathlib import Path

from tightfit.errors import ConfigError

RUN_MARKER = ".tightfit-run"


def mark_run_folder(run_dir: Path) -> None:
    """Mark ``run_dir`` as a tightfit run (a fresh start may reuse it until it has a checkpoint)."""
    (Path(run_dir) / RUN_MARKER).touch()


def check_new_run_folder(run_dir: str | os.PathLike) -> None:
    """Refuse a ``--run-dir`` a fresh run must not write into.

    Raises:
        ConfigError: ``run_dir`` is a file, cannot be written, already holds checkpoints
            (continue it with ``--resume``), or holds files that are not a run's.
    """
    from tightfit.runs.checkpoint import checkpoint_folders

    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run_dir: {path} is a file, not a folder; choose another --run-dir")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run_dir: {path} cannot be written here ({existing} is not a writable folder)")
    if not path.is_dir() or not any(path.iterdir()):
        return
    if checkpoint_folders(path / "checkpoints"):  # complete or damaged: --resume sorts them out
        raise ConfigError(
            f"run_dir: {path} already holds a run; continue it with --resume {path} or choose another --run-dir"
        )
    if not (path / RUN_MARKER).is_file():
        names = sorted(child.name for child in path.iterdir())
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise ConfigError(
            f"run_dir: {path} is not empty and is not a tightfit run (it holds {shown}); "
            "choose a new or empty folder: nothing of yours is overwritten"
        )
