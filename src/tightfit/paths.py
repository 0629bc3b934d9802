"""Paths that mean the same from any folder: relative to the file that holds them, or shipped.

A path written in a recipe or in a run's ``config.yaml`` is relative to *that file's folder*,
never to the folder the command was started from; a path typed on the command line is relative
to the current folder, as everywhere else. What ships inside the package is named
``packaged:NAME`` and resolved where tightfit is installed (a source checkout or site-packages),
so a recipe that uses it runs unchanged after ``pip install``:

==========================  =================================================================
``packaged:NAME``           is
==========================  =================================================================
``tiny-llama``              the 0.9 M-parameter Llama config and its 512-token tokenizer
``llama-7b``, ``llama-134m`` Llama architecture configs (no weights), for planning
``sd15-unet``               the SD 1.5 UNet config (no weights), for planning
``replies``, ``pirate-replies``, ``facts``  the shipped text corpora (``text-corpus`` source)
``support-messages``        the 400-sentence intent data set (``text-csv`` source)
``digits.yaml``             the default recipe
==========================  =================================================================

So ``model: hf:packaged:tiny-llama`` and ``data.tokenizer: packaged:tiny-llama``. A ``packaged:``
value is kept as written in a run's ``config.yaml`` (it resolves on any machine); every other
relative path is made absolute when the file is read (:func:`anchor`), and a run folder's own
paths are stored relative to it (:func:`relative_inside`), so a moved or copied run still finds
its files.
"""

import re
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGED_PREFIX = "packaged:"
PACKAGED = {
    "tiny-llama": "configs/tiny-llama",
    "llama-7b": "configs/llama-7b",
    "llama-134m": "configs/llama-134m",
    "sd15-unet": "configs/sd15-unet",
    "replies": "data/files/replies.jsonl",
    "pirate-replies": "data/files/pirate_replies.jsonl",
    "facts": "data/files/facts.txt",
    "support-messages": "data/files/support_messages.csv",
    "digits.yaml": "recipes/digits.yaml",
}
"""``packaged:NAME`` -> its path inside the installed package."""

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def packaged_path(name: str, where: str, kinds: tuple[str, ...] | None = None) -> Path:
    """The installed path of ``packaged:NAME``.

    Args:
        name: the name after ``packaged:``.
        where: the setting, for the error (``data.tokenizer``).
        kinds: the names this setting accepts (default: all of :data:`PACKAGED`).

    Raises:
        ValueError: an unknown name, listing the known ones (callers raise it as their ConfigError).
    """
    known = kinds if kinds is not None else tuple(PACKAGED)
    if name not in known:
        raise ValueError(f"{where}: no packaged {name!r} (packaged: {', '.join(known)})")
    return PACKAGE_DIR / PACKAGED[name]


def local_path(text: str, where: str, kinds: tuple[str, ...] | None = None) -> Path:
    """``text`` as a local path: ``packaged:NAME`` inside the package, ``~`` expanded."""
    if text.startswith(PACKAGED_PREFIX):
        return packaged_path(text.removeprefix(PACKAGED_PREFIX), where, kinds)
    return Path(text).expanduser()


def anchor(text: str, base: Path, *, may_be_hub_id: bool = False) -> str:
    """``text`` made absolute against ``base`` (the folder of the file that holds it).

    ``packaged:`` values, absolute paths and ``~/...`` are returned unchanged. With
    ``may_be_hub_id`` (a model folder or a tokenizer), a value shaped like a Hugging Face repo id
    (``org/name``) that names nothing under ``base`` is left for the local hub cache to resolve.
    """
    if text.startswith(PACKAGED_PREFIX) or text.startswith("~") or Path(text).is_absolute():
        return text
    candidate = (base / text).resolve()
    if may_be_hub_id and not candidate.exists() and _HUB_ID.fullmatch(text) and not text.startswith("."):
        return text
    return str(candidate)


def relative_inside(text: str, folder: Path) -> str:
    """``text`` relative to ``folder`` when it is an absolute path inside it (``.`` for the folder
    itself), else unchanged: what a run folder stores so that it can move."""
    if text.startswith(PACKAGED_PREFIX) or not Path(text).is_absolute():
        return text
    try:
        relative = Path(text).resolve().relative_to(folder.resolve())
    except ValueError:
        return text
    return str(relative) if str(relative) != "." else "."


def hub_cache_dir() -> Path:
    """The local Hugging Face hub cache, as transformers finds it: ``$HF_HUB_CACHE``, else
    ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``."""
    import os

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    return cache_home / "huggingface" / "hub"


def hub_snapshot(repo_id: str, revision: str = "main") -> Path | None:
    """The folder of ``repo_id`` in the local hub cache (``models--ORG--NAME/snapshots/HASH``,
    the commit ``refs/REVISION`` names, else the only snapshot), or None. Reads files only:
    nothing is ever downloaded."""
    if not _HUB_ID.fullmatch(repo_id):
        return None
    repo = hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / revision
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        return snapshot if snapshot.is_dir() else None
    snapshots = sorted(path for path in (repo / "snapshots").glob("*") if path.is_dir()) if repo.is_dir() else []
    return snapshots[0] if len(snapshots) == 1 else None


def model_folder(text: str, where: str) -> Path:
    """The local folder a model (or tokenizer) setting names: ``packaged:NAME``, a path, or a
    Hugging Face repo id (``org/name``) found in the local hub cache (:func:`hub_snapshot`).
    A value that is none of these comes back as a path; the caller says what is missing there."""
    path = local_path(text, where)
    if path.exists() or text.startswith(PACKAGED_PREFIX):
        return path
    return hub_snapshot(text) or path
