"""A preprocessing cache on disk, keyed by content hash and a description of the transform.

Decoding and resizing an image, or tokenising a corpus, costs far more than reading its result
back. The cache stores those results as safetensors files (never pickle: a cache folder may be
shared or copied, and loading it must not be able to run code) under a key that is the SHA-256
of the input's bytes plus a description of everything that shaped the output (size, colour
mode, tokenizer files, maximum length, a format version). Changing the content or any of those
settings changes the key, so a stale entry is never read; files are written to a temporary name
and renamed, so concurrent DataLoader workers and crashes never leave a half-written entry.

``cache: true`` uses ``$TIGHTFIT_CACHE_DIR`` or ``~/.cache/tightfit/data``
(``$XDG_CACHE_HOME`` respected); ``cache: DIR`` uses ``DIR``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CACHE_FORMAT_VERSION = 1  # bump when what an entry holds changes, to orphan old entries


def default_cache_dir() -> Path:
    """Where ``cache: true`` puts its files."""
    if os.environ.get("TIGHTFIT_CACHE_DIR"):
        return Path(os.environ["TIGHTFIT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "tightfit" / "data"


def resolve_cache_dir(cache: bool | str | None) -> Path | None:
    """The cache folder for a ``cache:`` setting, or ``None`` when caching is off."""
    if cache is None or cache is False:
        return None
    if cache is True:
        return default_cache_dir()
    return Path(cache).expanduser()


def hash_bytes(data: bytes) -> str:
    """SHA-256 hex digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


def hash_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's content, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def describe(**settings: Any) -> str:
    """A canonical text for the settings that shape a cached result (sorted JSON)."""
    return json.dumps({"version": CACHE_FORMAT_VERSION, **settings}, sort_keys=True, default=str)


class TensorCache:
    """Tensors stored on disk under a key, in one namespace (``images``, ``tokens``, ...).

    Args:
        directory: the cache root.
        namespace: a sub-folder, so different kinds of entries never collide.

    Attributes:
        hits: entries read back in this process.
        misses: lookups that found nothing (the caller computes and stores the result).
    """

    def __init__(self, directory: str | Path, namespace: str):
        self.directory = Path(directory) / namespace
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(content_hash: str, description: str) -> str:
        """The entry key for content with this hash, transformed as ``description`` says."""
        return hash_bytes(f"{content_hash}\n{description}".encode())

    def _path(self, key: str) -> Path:
        # Two-character fan-out keeps folders small when a data set has many thousand images.
        return self.directory / key[:2] / f"{key}.safetensors"

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        """The tensors stored under ``key``, or ``None`` (counted as a miss)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self._path(key)
        if path.is_file():
            try:
                tensors = load_file(str(path))
            except (SafetensorError, OSError):
                # A damaged entry (disk full at write time, a truncated copy) is recomputed.
                tensors = None
            if tensors is not None:
                self.hits += 1
                return tensors
        self.misses += 1
        return None

    def save(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Store ``tensors`` under ``key`` atomically (temporary file, then rename)."""
        from safetensors.torch import save_file

        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(handle)
        try:
            save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, temporary)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def entries(self) -> int:
        """How many entries the namespace holds on disk."""
        return sum(1 for _ in self.directory.glob("*/*.safetensors")) if self.directory.is_dir() else 0
