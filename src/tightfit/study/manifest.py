"""Stage manifests: what a stage ran with, so a re-run skips what did not change.

``STUDY/stages/NAME/manifest.json`` records the stage's settings, its cache key, the keys of the
stages it read, the package versions, the estimated and measured seconds and ``status``. The key
hashes the stage's settings, the study settings every stage depends on (data, folds, seed, device),
the fingerprint of the data and of any weights file, and the keys of its inputs, so a change
anywhere upstream re-runs everything downstream and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST_FILE = "manifest.json"
_PACKAGES = (
    "tightfit",
    "torch",
    "numpy",
    "scikit-learn",
    "scipy",
    "safetensors",
    "mlflow-skinny",
    "mlflow",
    "nibabel",
    "monai",
    "pydicom",
)


def package_versions() -> dict[str, str]:
    """Python and the installed versions of the packages a study's results depend on."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def fingerprint_path(path: str | Path) -> str:
    """A file's (or a folder's files') sizes and modification times, hashed: cheap, and changes with them."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(item for item in path.rglob("*") if item.is_file()) if path.is_dir() else [path]
    for item in files:
        status = item.stat()
        digest.update(
            f"{item.relative_to(path) if path.is_dir() else item.name}:{status.st_size}:{status.st_mtime_ns}\n".encode()
        )
    return digest.hexdigest()[:16]


def cache_key(parts: dict[str, Any]) -> str:
    """A stable hash of JSON-ready ``parts``."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_manifest(stage_dir: Path) -> dict | None:
    path = Path(stage_dir) / MANIFEST_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_manifest(stage_dir: Path, manifest: dict) -> None:
    """Write atomically: a killed run never leaves a half-written manifest saying ``complete``."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    temporary = stage_dir / (MANIFEST_FILE + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(temporary, stage_dir / MANIFEST_FILE)
