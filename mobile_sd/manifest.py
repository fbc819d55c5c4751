"""``manifest.json``: what an export folder holds, written by every exporter, read by parity
and bench.

Shape (``schema: mobile-sd/manifest/v1``)::

    {"schema": ..., "created": ..., "tool_versions": {...}, "machine": {...}, "git_sha": ...,
     "recipe": {...full recipe...}, "model": {"source": ..., "spec": ...},
     "pipeline": {"steps": 8, "guidance": 4.5, "cfg": "batch2"|"folded", "latent_size": 64,
                  "scaling_factor": 0.18215, "scheduler": {...DDIMScheduler config...}},
     "format": "coreml"|"executorch"|"onnx", "backend": "...",
     "components": {"unet": {
         "files": [{"path": "unet.pte", "format": "pte", "backend": "xnnpack", "bytes": N,
                    "sha256": "..."}, ...],   # a chunk may carry its own inputs/outputs
         "interface": "native"|"swift",
         "inputs": [{"name": "sample", "shape": [2, 4, 64, 64], "dtype": "float32"}, ...],
         "outputs": [...], ...exporter-specific keys (compression, lint, delegation...)}},
     "extra_files": [{"path": "vocab.json", "bytes": N, "sha256": "..."}],
     "skipped": [{"step": "...", "reason": "..."}]}
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from mobile_sd.errors import ParityError
from mobile_sd.utils.env import git_sha, machine_info, tool_versions
from mobile_sd.utils.files import sha256_file, size_bytes

SCHEMA = "mobile-sd/manifest/v1"
FORMATS = {".pte": "pte", ".ptd": "ptd", ".bpte": "bpte", ".etrecord": "etrecord",
           ".onnx": "onnx", ".data": "onnx_data", ".mlpackage": "mlpackage",
           ".mlmodelc": "mlmodelc", ".json": "json", ".txt": "txt"}


def tensor_entry(name: str, shape: Iterable[int], dtype: str) -> dict[str, Any]:
    return {"name": name, "shape": [int(s) for s in shape], "dtype": dtype}


def file_entry(root: Path, path: Path, **extra) -> dict[str, Any]:
    """Path (relative to ``root``), format, size and sha256 of one written file/package."""
    return {"path": str(path.relative_to(root)), "format": FORMATS.get(path.suffix, path.suffix[1:]),
            "bytes": size_bytes(path), "sha256": sha256_file(path), **extra}


def new_manifest(recipe: dict, model_source: str, spec_name: str, pipeline: dict,
                 fmt: str, backend: str) -> dict[str, Any]:
    return {"schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "tool_versions": tool_versions(), "machine": machine_info(), "git_sha": git_sha(),
            "recipe": recipe, "model": {"source": model_source, "spec": spec_name},
            "pipeline": pipeline, "format": fmt, "backend": backend, "components": {},
            "extra_files": [], "skipped": []}


def write_manifest(folder: Path, manifest: dict) -> Path:
    path = Path(folder) / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return path


def load_manifest(folder: str | Path) -> dict[str, Any]:
    """Read and check the manifest of an export folder (:class:`ParityError` if unusable)."""
    folder = Path(folder)
    path = folder / "manifest.json"
    if not folder.is_dir():
        raise ParityError(f"{folder}: no such artifact folder; write one with `mobile-sd export`")
    if not path.is_file():
        raise ParityError(f"{folder}: no manifest.json; this is not a folder written by "
                          "`mobile-sd export` (re-export it)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ParityError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise ParityError(f"{path}: schema is {manifest.get('schema') if isinstance(manifest, dict) else None!r}, "
                          f"expected {SCHEMA!r}; re-export with this mobile-sd version")
    if not isinstance(manifest.get("components"), dict) or not manifest["components"]:
        raise ParityError(f"{path}: 'components' is missing or empty")
    return manifest


def verify_files(folder: str | Path, manifest: dict) -> None:
    """Every listed file exists and has the sha256 the manifest records."""
    folder = Path(folder)
    for name, comp in manifest["components"].items():
        for entry in comp.get("files", []):
            path = folder / entry["path"]
            if not path.exists():
                raise ParityError(f"{path}: listed in manifest.json ({name}) but missing; "
                                  "the folder is incomplete, re-export it")
            digest = sha256_file(path)
            if digest != entry.get("sha256"):
                raise ParityError(f"{path}: sha256 {digest[:12]}… does not match manifest.json "
                                  f"({str(entry.get('sha256'))[:12]}…); the file changed after "
                                  "export: re-export, or restore the original file")
