"""An export folder's ``manifest.json`` (typed, :mod:`mobile_sd.manifest`) as the list of
things to benchmark.

A file entry may carry its own ``inputs`` (a UNet split in chunks). A ``.ptd`` is the weights
of the component's ``.pte``, an ``.etrecord`` names its ops in the ETDump table and ONNX
external data (``onnx_data``) is pushed next to its model; other non-runnable files (bundled
programs, vocab) are not benchmarked. Every listed file is verified (size + sha256) before use.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mobile_sd.bench.errors import BenchManifestError
from mobile_sd.manifest import Manifest, TensorEntry

#: Files a runnable file needs beside it on the device (ONNX external data).
COMPANIONS = {"onnx": {"onnx_data", "data"}, "qnn_context": {"qnn_bin"}}


@dataclass(frozen=True)
class BenchItem:
    """One runnable file of one component, with the inputs to feed it."""

    component: str
    path: Path
    format: str
    backend: str | None
    sha256: str | None
    inputs: list
    data_file: Path | None = None
    etrecord: Path | None = None
    companions: tuple = ()


def load_manifest(artifact_dir: str | Path) -> Manifest:
    """The typed, verified manifest of ``artifact_dir`` (``ManifestError`` if unusable)."""
    from mobile_sd.manifest import load_manifest as load_typed, verify_files

    manifest = load_typed(artifact_dir)
    verify_files(artifact_dir, manifest)
    return manifest


def bench_items(manifest: Manifest, artifact_dir: str | Path) -> list[BenchItem]:
    """Every runnable file of every component, in manifest order."""
    root = Path(artifact_dir)
    items = []
    for name, comp in manifest.components.items():
        runnable = comp.runnable_files()
        if not runnable:
            raise BenchManifestError(f"manifest.json: components.{name} has no runnable file "
                                     "(.pte, .onnx, .mlpackage)")
        ptd = [root / f.path for f in comp.files_with_format("ptd")]
        etrecord = [root / f.path for f in comp.files_with_format("etrecord")]
        for entry in runnable:
            inputs = [t.to_dict() for t in _inputs(entry.inputs or comp.inputs, name)]
            pte = entry.format == "pte"
            companions = tuple(root / f.path for f in comp.files
                               if f.format in COMPANIONS.get(entry.format, ()))
            items.append(BenchItem(name, root / entry.path, entry.format, entry.backend,
                                   entry.sha256, inputs, ptd[0] if pte and ptd else None,
                                   etrecord[0] if pte and etrecord else None, companions))
    return items


def _inputs(inputs: tuple[TensorEntry, ...], name: str) -> tuple[TensorEntry, ...]:
    if not inputs:
        raise BenchManifestError(f"manifest.json: components.{name}.inputs must be a non-empty "
                                 "list of {name, shape, dtype}")
    return inputs


def pipeline(manifest: Manifest) -> dict | None:
    """``{"steps", "cfg"}`` of the manifest, or None when it has no pipeline section."""
    from mobile_sd.bench.budget import CFG_MODES

    pipe = manifest.pipeline
    if not pipe:
        return None
    steps, cfg = pipe.get("steps"), pipe.get("cfg")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise BenchManifestError(f"manifest.json: pipeline.steps must be an integer >= 1, "
                                 f"got {steps!r}")
    if cfg not in CFG_MODES:
        raise BenchManifestError(f"manifest.json: pipeline.cfg must be one of {CFG_MODES}, "
                                 f"got {cfg!r}")
    return {"steps": steps, "cfg": cfg}
