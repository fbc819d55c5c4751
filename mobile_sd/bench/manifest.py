"""Read an export folder's ``manifest.json`` into the list of things to benchmark.

Expected shape (extra keys are ignored, missing or wrong ones are errors naming the key)::

    {"schema": "mobile-sd/manifest/v1", "recipe": {...},
     "components": {"unet": {"files": [{"path": "unet.pte", "sha256": "...", "format": "pte",
                                        "backend": "xnnpack"}],
                             "inputs": [{"name": "sample", "shape": [2, 4, 64, 64],
                                         "dtype": "float32"}], "outputs": [...]}, ...},
     "pipeline": {"steps": 8, "cfg": "batch2" | "folded"}}

(the full schema is in :mod:`mobile_sd.manifest`). A file entry may carry its own ``inputs``
(a UNet split in chunks). A ``.ptd`` is the weights of the component's ``.pte``, an
``.etrecord`` names its ops in the ETDump table and ONNX external data (``onnx_data``) is
pushed next to its model; other non-runnable files (bundled programs, vocab) are skipped.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mobile_sd.bench.errors import BenchManifestError

RUNNABLE = {"pte", "onnx", "mlpackage", "mlmodelc"}
#: Files a runnable file needs beside it on the device (ONNX external data).
COMPANIONS = {"onnx": {"onnx_data", "data"}}
DTYPES = {"float32", "float16", "int64", "int32", "int8", "uint8", "bool"}


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


def load_manifest(artifact_dir: str | Path) -> dict:
    """Parsed ``manifest.json`` of ``artifact_dir`` (``ParityError`` if missing or invalid).

    The file-level checks (folder, JSON, schema, non-empty components) are the shared ones of
    :func:`mobile_sd.manifest.load_manifest`; :func:`bench_items` checks what the bench needs.
    """
    from mobile_sd.manifest import load_manifest as load_shared

    return load_shared(artifact_dir)


def bench_items(manifest: dict, artifact_dir: str | Path) -> list[BenchItem]:
    """Every runnable file of every component, in manifest order, validated."""
    root = Path(artifact_dir)
    items = []
    for name, comp in manifest["components"].items():
        where = f"manifest.json: components.{name}"
        files = comp.get("files") if isinstance(comp, dict) else None
        if not isinstance(files, list) or not files:
            raise BenchManifestError(f"{where}.files must be a non-empty list")
        ptd = [root / f["path"] for f in files if _format(f, where) == "ptd"]
        etrecord = [root / f["path"] for f in files if _format(f, where) == "etrecord"]
        runnable = [(i, f) for i, f in enumerate(files) if _format(f, where) in RUNNABLE]
        if not runnable:
            raise BenchManifestError(f"{where} has no runnable file (.pte, .onnx, .mlpackage)")
        for i, entry in runnable:
            path = root / entry["path"]
            if not path.exists():
                raise BenchManifestError(f"{where}.files[{i}]: {path} is listed but missing; "
                                         "the folder is incomplete, re-export it")
            inputs = _inputs(entry.get("inputs", comp.get("inputs")), f"{where}.files[{i}]")
            fmt = _format(entry, where)
            pte = fmt == "pte"
            companions = tuple(root / f["path"] for f in files
                               if _format(f, where) in COMPANIONS.get(fmt, ()))
            items.append(BenchItem(name, path, fmt, entry.get("backend"), entry.get("sha256"),
                                   inputs, ptd[0] if pte and ptd else None,
                                   etrecord[0] if pte and etrecord else None, companions))
    return items


def pipeline(manifest: dict) -> dict | None:
    """``{"steps", "cfg"}`` of the manifest, or None when it has no pipeline section."""
    from mobile_sd.bench.budget import CFG_MODES

    pipe = manifest.get("pipeline")
    if pipe is None:
        return None
    steps, cfg = (pipe.get("steps"), pipe.get("cfg")) if isinstance(pipe, dict) else (None, None)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise BenchManifestError(f"manifest.json: pipeline.steps must be an integer >= 1, "
                                 f"got {steps!r}")
    if cfg not in CFG_MODES:
        raise BenchManifestError(f"manifest.json: pipeline.cfg must be one of {CFG_MODES}, "
                                 f"got {cfg!r}")
    return {"steps": steps, "cfg": cfg}


def _format(entry, where: str) -> str:
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        raise BenchManifestError(f"{where}.files: every entry needs a 'path' string, got "
                                 f"{entry!r}")
    fmt = entry.get("format") or Path(entry["path"]).suffix.lstrip(".")
    return str(fmt).lower()


def _inputs(spec, where: str) -> list:
    if not isinstance(spec, list) or not spec:
        raise BenchManifestError(f"{where}: 'inputs' must be a non-empty list of "
                                 "{name, shape, dtype}")
    for k, entry in enumerate(spec):
        ok = (isinstance(entry, dict) and isinstance(entry.get("name"), str)
              and isinstance(entry.get("shape"), list)
              and all(isinstance(d, int) and d > 0 for d in entry["shape"]))
        if not ok:
            raise BenchManifestError(f"{where}.inputs[{k}] must be {{name: str, shape: "
                                     f"[positive ints], dtype}}, got {entry!r}")
        if entry.get("dtype") not in DTYPES:
            raise BenchManifestError(f"{where}.inputs[{k}].dtype {entry.get('dtype')!r} is not "
                                     f"one of {sorted(DTYPES)}")
    return spec
