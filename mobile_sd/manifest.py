"""``manifest.json``: what an export folder holds. Written in one place (the export engine),
read with a schema check by parity and bench.

Shape (``schema: mobile-sd/manifest/v1``)::

    {"schema": ..., "created": ..., "tool_versions": {...}, "machine": {...}, "git_sha": ...,
     "recipe": {...full recipe...}, "model": {"source": ..., "spec": ...},
     "pipeline": {"steps": 8, "guidance": 4.5, "cfg": "batch2"|"folded", "latent_size": 64,
                  "scaling_factor": 0.18215, "scheduler": {...DDIMScheduler config...}},
     "format": "coreml"|"executorch"|"onnx", "backend": "...",
     "components": {"unet": {
         "files": [{"path": "unet.pte", "format": "pte", "bytes": N, "sha256": "...",
                    "backend": "xnnpack", "role": "model"}, ...],  # a chunk carries its own I/O
         "precision": "fp32", "interface": "native"|"swift", "surgery": [...],
         "inputs": [{"name": "sample", "shape": [2, 4, 64, 64], "dtype": "float32"}, ...],
         "outputs": [...], "export_seconds": s, "peak_rss_mb": mb,
         "parity_budget": {"min_psnr_db": 40.0},
         ...format details (compression, ane_lint, delegation...)}},
     "extra_files": [{"path": "vocab.json", "bytes": N, "sha256": "...", "role": "tokenizer"}],
     "skipped": [{"step": "...", "reason": "..."}]}

:class:`Manifest`, :class:`ComponentEntry`, :class:`FileEntry` and :class:`TensorEntry` are the
typed form; :func:`load_manifest` parses a folder's file into them and raises
:class:`~mobile_sd.errors.ManifestError` naming the key at fault.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mobile_sd.errors import ManifestError
from mobile_sd.utils.env import git_sha, machine_info, tool_versions
from mobile_sd.utils.files import sha256_file, size_bytes

SCHEMA = "mobile-sd/manifest/v1"
FORMATS = {".pte": "pte", ".ptd": "ptd", ".bpte": "bpte", ".etrecord": "etrecord",
           ".onnx": "onnx", ".data": "onnx_data", ".mlpackage": "mlpackage",
           ".mlmodelc": "mlmodelc", ".json": "json", ".txt": "txt"}
#: ``qnn_context``: an ONNX Runtime EPContext wrapper (.onnx) of a QNN context binary
#: (``qnn_bin``); the exporter sets these formats, the suffix alone says "onnx" / "bin".
RUNNABLE = ("pte", "onnx", "mlpackage", "mlmodelc", "qnn_context")
DTYPES = ("float32", "float16", "int64", "int32", "int8", "uint8", "bool")


def _need(ok: bool, where: str, what: str, got: Any) -> None:
    if not ok:
        raise ManifestError(f"manifest.json: {where} must be {what}, got {got!r:.80}; "
                            "the folder was not written by this mobile-sd version: re-export it")


def _obj(value: Any, where: str) -> dict:
    _need(isinstance(value, dict), where, "an object", value)
    return value


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "TensorEntry":
        data = _obj(data, where)
        shape = data.get("shape")
        _need(isinstance(data.get("name"), str), f"{where}.name", "a string", data.get("name"))
        _need(isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool)
                                              and d > 0 for d in shape),
              f"{where}.shape", "a list of positive integers", shape)
        dtype = data.get("dtype", "float32")
        _need(dtype in DTYPES, f"{where}.dtype", f"one of {', '.join(DTYPES)}", dtype)
        return cls(data["name"], tuple(shape), dtype)

    @classmethod
    def of(cls, spec) -> "TensorEntry":
        """From anything with ``name``, ``shape`` and ``dtype`` (an export ``TensorSpec``)."""
        return cls(spec.name, tuple(int(s) for s in spec.shape), spec.dtype)

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def _tensors(value: Any, where: str) -> tuple[TensorEntry, ...]:
    _need(isinstance(value, list), where, "a list of {name, shape, dtype}", value)
    return tuple(TensorEntry.from_dict(v, f"{where}[{i}]") for i, v in enumerate(value))


@dataclass(frozen=True)
class FileEntry:
    """One written file or package: path relative to the export folder, size and sha256."""
    path: str
    format: str
    bytes: int
    sha256: str
    role: str | None = None
    backend: str | None = None
    inputs: tuple[TensorEntry, ...] | None = None    # a chunk's own I/O
    outputs: tuple[TensorEntry, ...] | None = None
    #: Why two exports of the same inputs can give different bytes for this file (written as
    #: ``"reproducible": false`` + this reason); None: the file is byte-for-byte reproducible.
    not_reproducible: str | None = None

    @classmethod
    def of(cls, root: Path, path: Path, role: str | None = None, backend: str | None = None,
           inputs=None, outputs=None) -> "FileEntry":
        """Measure ``path`` (a file or a package folder) under ``root``."""
        tensors = lambda xs: None if xs is None else tuple(  # noqa: E731
            x if isinstance(x, TensorEntry) else TensorEntry.from_dict(x, "chunk I/O") for x in xs)
        return cls(str(Path(path).relative_to(root)), FORMATS.get(path.suffix, path.suffix[1:]),
                   size_bytes(path), sha256_file(path), role, backend, tensors(inputs),
                   tensors(outputs))

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "FileEntry":
        data = _obj(data, where)
        path = data.get("path")
        _need(isinstance(path, str) and path and not Path(path).is_absolute()
              and ".." not in Path(path).parts, f"{where}.path",
              "a relative path inside the folder", path)
        fmt = data.get("format") or Path(path).suffix.lstrip(".")
        _need(isinstance(data.get("sha256"), str), f"{where}.sha256", "a hex string",
              data.get("sha256"))
        size = data.get("bytes")
        _need(isinstance(size, int) and not isinstance(size, bool) and size >= 0,
              f"{where}.bytes", "a byte count", size)
        io = {k: _tensors(data[k], f"{where}.{k}") if k in data else None
              for k in ("inputs", "outputs")}
        reproducible = data.get("reproducible", True)
        _need(isinstance(reproducible, bool), f"{where}.reproducible", "true or false",
              reproducible)
        reason = None if reproducible else str(data.get("reproducible_reason") or "unknown")
        return cls(path, str(fmt).lower(), size, data["sha256"], data.get("role"),
                   data.get("backend"), **io, not_reproducible=reason)

    @property
    def runnable(self) -> bool:
        return self.format in RUNNABLE

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"path": self.path, "format": self.format, "bytes": self.bytes,
                               "sha256": self.sha256}
        for key in ("backend", "role"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        for key in ("inputs", "outputs"):
            if getattr(self, key) is not None:
                out[key] = [t.to_dict() for t in getattr(self, key)]
        if self.not_reproducible is not None:
            out.update(reproducible=False, reproducible_reason=self.not_reproducible)
        return out


@dataclass
class ComponentEntry:
    """One exported component: its files, I/O contract, surgery and the exporter's details."""
    files: list[FileEntry]
    inputs: tuple[TensorEntry, ...]
    outputs: tuple[TensorEntry, ...]
    precision: str | None = None
    interface: str = "native"
    surgery: list[str] = field(default_factory=list)
    export_seconds: float | None = None
    peak_rss_mb: float | None = None
    min_psnr_db: float | None = None
    details: dict[str, Any] = field(default_factory=dict)  # format-specific (compression...)

    @classmethod
    def from_export(cls, details: dict, *, inputs, outputs, min_psnr_db: float,
                    **fields) -> "ComponentEntry":
        """From an exporter's result dict (``files`` + ``precision`` + details)."""
        details = dict(details)
        return cls(files=details.pop("files", []), precision=details.pop("precision", None),
                   inputs=tuple(TensorEntry.of(s) for s in inputs),
                   outputs=tuple(TensorEntry.of(s) for s in outputs),
                   min_psnr_db=min_psnr_db, details=details, **fields)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "ComponentEntry":
        data = dict(_obj(data, where))
        files = data.pop("files", None)
        _need(isinstance(files, list) and files, f"{where}.files", "a non-empty list", files)
        budget = data.pop("parity_budget", None) or {}
        _obj(budget, f"{where}.parity_budget")
        surgery = data.pop("surgery", [])
        _need(isinstance(surgery, list) and all(isinstance(s, str) for s in surgery),
              f"{where}.surgery", "a list of pass names", surgery)
        return cls(files=[FileEntry.from_dict(f, f"{where}.files[{i}]")
                          for i, f in enumerate(files)],
                   inputs=_tensors(data.pop("inputs", None), f"{where}.inputs"),
                   outputs=_tensors(data.pop("outputs", None), f"{where}.outputs"),
                   precision=data.pop("precision", None),
                   interface=data.pop("interface", "native"), surgery=surgery,
                   export_seconds=data.pop("export_seconds", None),
                   peak_rss_mb=data.pop("peak_rss_mb", None),
                   min_psnr_db=budget.get("min_psnr_db"), details=data)

    def runnable_files(self) -> list[FileEntry]:
        return [f for f in self.files if f.runnable]

    def files_with_format(self, fmt: str) -> list[FileEntry]:
        return [f for f in self.files if f.format == fmt]

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"files": [f.to_dict() for f in self.files]}
        if self.precision is not None:
            out["precision"] = self.precision
        out.update(self.details)
        out.update(interface=self.interface, surgery=list(self.surgery),
                   inputs=[t.to_dict() for t in self.inputs],
                   outputs=[t.to_dict() for t in self.outputs],
                   export_seconds=self.export_seconds, peak_rss_mb=self.peak_rss_mb,
                   parity_budget={"min_psnr_db": self.min_psnr_db})
        return out


@dataclass
class Manifest:
    recipe: dict
    model: dict
    pipeline: dict
    format: str
    backend: str
    components: dict[str, ComponentEntry] = field(default_factory=dict)
    extra_files: list[FileEntry] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    created: str = ""
    tool_versions: dict = field(default_factory=dict)
    machine: dict = field(default_factory=dict)
    git_sha: str | None = None

    @classmethod
    def new(cls, recipe: dict, model_source: str, spec_name: str, pipeline: dict, fmt: str,
            backend: str) -> "Manifest":
        return cls(recipe=recipe, model={"source": model_source, "spec": spec_name},
                   pipeline=pipeline, format=fmt, backend=backend,
                   created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   tool_versions=tool_versions(), machine=machine_info(), git_sha=git_sha())

    @classmethod
    def from_dict(cls, data: Any) -> "Manifest":
        data = _obj(data, "the file")
        _need(data.get("schema") == SCHEMA, "schema", repr(SCHEMA), data.get("schema"))
        comps = _obj(data.get("components"), "components")
        _need(bool(comps), "components", "a non-empty object", comps)
        extra = data.get("extra_files", [])
        _need(isinstance(extra, list), "extra_files", "a list", extra)
        skipped = data.get("skipped", [])
        _need(isinstance(skipped, list), "skipped", "a list", skipped)
        return cls(recipe=_obj(data.get("recipe", {}), "recipe"),
                   model=_obj(data.get("model", {}), "model"),
                   pipeline=_obj(data.get("pipeline", {}), "pipeline"),
                   format=str(data.get("format", "")), backend=str(data.get("backend", "")),
                   components={name: ComponentEntry.from_dict(c, f"components.{name}")
                               for name, c in comps.items()},
                   extra_files=[FileEntry.from_dict(f, f"extra_files[{i}]")
                                for i, f in enumerate(extra)],
                   skipped=skipped, created=str(data.get("created", "")),
                   tool_versions=data.get("tool_versions") or {},
                   machine=data.get("machine") or {}, git_sha=data.get("git_sha"))

    def all_files(self) -> list[tuple[str, FileEntry]]:
        """``(owner, entry)`` for every listed file: components' and bundle-level ones."""
        return ([(name, f) for name, c in self.components.items() for f in c.files]
                + [("extra_files", f) for f in self.extra_files])

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "created": self.created, "tool_versions": self.tool_versions,
                "machine": self.machine, "git_sha": self.git_sha, "recipe": self.recipe,
                "model": self.model, "pipeline": self.pipeline, "format": self.format,
                "backend": self.backend,
                "components": {n: c.to_dict() for n, c in self.components.items()},
                "extra_files": [f.to_dict() for f in self.extra_files], "skipped": self.skipped}


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    path = Path(folder) / "manifest.json"
    path.write_text(json.dumps(manifest.to_dict(), indent=2, default=str) + "\n")
    return path


def load_manifest(folder: str | Path) -> Manifest:
    """Read and check the manifest of an export folder (:class:`ManifestError` if unusable)."""
    folder = Path(folder)
    path = folder / "manifest.json"
    if not folder.is_dir():
        raise ManifestError(f"{folder}: no such artifact folder; write one with `mobile-sd export`")
    if not path.is_file():
        raise ManifestError(f"{folder}: no manifest.json; this is not a folder written by "
                            "`mobile-sd export` (re-export it)")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text ({exc.reason}); re-export the folder") from exc
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from exc
    except RecursionError as exc:
        raise ManifestError(f"{path}: nested too deeply to be a manifest") from exc
    return Manifest.from_dict(data)


def verify_files(folder: str | Path, manifest: Manifest) -> None:
    """Every listed file exists with the size and sha256 the manifest records."""
    folder = Path(folder)
    for owner, entry in manifest.all_files():
        path = folder / entry.path
        if not path.exists():
            raise ManifestError(f"{path}: listed in manifest.json ({owner}) but missing; "
                                "the folder is incomplete, re-export it")
        size = size_bytes(path)
        digest = sha256_file(path) if size == entry.bytes else None
        if digest != entry.sha256:
            found = f"{size} bytes" if digest is None else f"sha256 {digest[:12]}…"
            raise ManifestError(f"{path}: {found} does not match manifest.json "
                                f"({entry.bytes} bytes, sha256 {entry.sha256[:12]}…); the file "
                                "changed after export: re-export, or restore the original file")
