"""Hand-written manifests for tests that build export folders byte by byte: the fields a real
export records (bytes, sha256, outputs, schema) are filled in from the files on disk."""
from __future__ import annotations

import copy
import json
from pathlib import Path

from mobile_sd.manifest import SCHEMA, Manifest
from mobile_sd.utils.files import sha256_file, size_bytes


def completed(manifest: dict, folder: Path) -> dict:
    """``manifest`` with schema, each existing file's bytes/sha256 and default outputs."""
    data = copy.deepcopy(manifest)
    data.setdefault("schema", SCHEMA)
    for comp in (data.get("components") or {}).values():
        if not isinstance(comp, dict):
            continue
        comp.setdefault("outputs", [{"name": "out", "shape": [1], "dtype": "float32"}])
        for entry in comp.get("files") or []:
            path = Path(folder) / entry.get("path", "")
            if isinstance(entry, dict) and path.exists():
                entry.setdefault("bytes", size_bytes(path))
                entry.setdefault("sha256", sha256_file(path))
    return data


def write(folder: Path, manifest: dict) -> Path:
    """Write ``completed(manifest)`` as ``folder/manifest.json``."""
    path = Path(folder) / "manifest.json"
    path.write_text(json.dumps(completed(manifest, folder)))
    return path


def typed(manifest: dict, folder: Path = Path(".")) -> Manifest:
    return Manifest.from_dict(completed(manifest, folder))
