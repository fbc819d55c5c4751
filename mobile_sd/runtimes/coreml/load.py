"""Open a saved ``.mlpackage`` as a MIL :class:`Program` on any platform (no Core ML needed).

Checks what coremltools' loader does not: the path is a package, the model is an ML Program,
the weights folder exists and every blob a const op points at lies inside its weight file
(coremltools' native blob reader would otherwise read past the end of a truncated file).
"""
from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from mobile_sd.runtimes.coreml.errors import MilRuntimeError

_BLOB_SENTINEL = 0xDEADBEEF
_BLOB_META = struct.Struct("<IIQQ")       # sentinel, dtype, size in bytes, data offset
_META_BYTES = 64


@dataclass
class LoadedPackage:
    """A MIL program read back from a package, with what the interpreter needs around it."""
    path: Path
    program: object                  # coremltools.converters.mil.Program
    function: object                 # its "main" function
    spec_version: int
    input_names: list[str]
    output_names: list[str]
    weights_dir: Path | None


def _quiet_coremltools() -> None:
    for name in ("coremltools", "coremltools.converters"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _iter_blob_values(block_spec):
    for op in block_spec.operations:
        values = list(op.attributes.values())
        for arg in op.inputs.values():            # constexpr inputs carry inline blob values
            values += [a.value for a in arg.arguments if a.WhichOneof("binding") == "value"]
        for value in values:
            if value.WhichOneof("value") == "blobFileValue":
                yield value.blobFileValue
        for inner in op.blocks:
            yield from _iter_blob_values(inner)


def check_weight_blobs(path: Path, model_spec, weights_dir: Path | None) -> None:
    """Raise :class:`MilRuntimeError` if a blob that the program references is missing/cut."""
    sizes: dict[str, int] = {}
    for function in model_spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            for blob in _iter_blob_values(block):
                fname = blob.fileName.split("/")[-1]
                if weights_dir is None or not weights_dir.is_dir():
                    raise MilRuntimeError(
                        f"{path}: weights folder {weights_dir or 'Data/com.apple.CoreML/weights'} is "
                        f"missing (the program reads '{fname}'); copy the whole .mlpackage again")
                wfile = weights_dir / fname
                if fname not in sizes:
                    if not wfile.is_file():
                        raise MilRuntimeError(f"{path}: weight file {wfile} is missing; copy the "
                                              f"whole .mlpackage again")
                    sizes[fname] = wfile.stat().st_size
                size = sizes[fname]
                if blob.offset + _META_BYTES > size:
                    raise MilRuntimeError(_truncated(path, wfile, size, blob.offset + _META_BYTES))
                with open(wfile, "rb") as fh:
                    fh.seek(blob.offset)
                    sentinel, _dtype, nbytes, data_off = _BLOB_META.unpack(fh.read(_BLOB_META.size))
                if sentinel != _BLOB_SENTINEL:
                    raise MilRuntimeError(f"{path}: weight file {wfile} is corrupt (no blob header at "
                                          f"offset {blob.offset}); re-export the package")
                if data_off + nbytes > size:
                    raise MilRuntimeError(_truncated(path, wfile, size, data_off + nbytes))


def _truncated(path, wfile, size, needed) -> str:
    return (f"{path}: weight file {wfile} is truncated ({size} bytes, the program needs "
            f"{needed}); copy or re-export the package")


def _check_manifest_items(path: Path) -> None:
    try:
        manifest = json.loads((path / "Manifest.json").read_text())
        entries = manifest["itemInfoEntries"]
    except (OSError, ValueError, KeyError, TypeError):
        raise MilRuntimeError(f"{path}: Manifest.json is unreadable or has no itemInfoEntries; "
                              f"re-export the package") from None
    for entry in entries.values():
        item = path / "Data" / str(entry.get("path", ""))
        if not item.exists():
            what = "weights folder" if "weights" in item.name else "item"
            raise MilRuntimeError(f"{path}: {what} {item} listed in Manifest.json is missing; "
                                  f"copy the whole .mlpackage again")


def load_package(path: str | os.PathLike, function_name: str = "main") -> LoadedPackage:
    """Read ``path`` (an ``.mlpackage`` directory) into a MIL program; errors are one line."""
    path = Path(path)
    if not path.exists():
        raise MilRuntimeError(f"{path}: no such Core ML package")
    if not path.is_dir() or not (path / "Manifest.json").is_file():
        raise MilRuntimeError(f"{path}: not an .mlpackage (a directory with Manifest.json); pass the "
                              f"package folder that the export wrote")
    _quiet_coremltools()
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto import load as milproto_load

    _check_manifest_items(path)
    try:
        mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
    except Exception as exc:  # coremltools raises bare Exceptions for broken packages
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MilRuntimeError(f"{path}: cannot read the package ({msg}); re-export it") from None
    spec = mlmodel.get_spec()
    kind = spec.WhichOneof("Type")
    if kind != "mlProgram":
        raise MilRuntimeError(f"{path}: is a '{kind}' Core ML model, not an ML Program; the MIL "
                              f"runtime needs convert_to='mlprogram' (iOS15+ target)")
    wdir = Path(mlmodel.weights_dir) if mlmodel.weights_dir else None
    check_weight_blobs(path, spec, wdir)
    try:
        program = milproto_load.load(spec, specification_version=spec.specificationVersion,
                                     file_weights_dir=str(wdir) if wdir else "")
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MilRuntimeError(f"{path}: coremltools cannot rebuild the MIL program ({msg})") from None
    if function_name not in program.functions:
        raise MilRuntimeError(f"{path}: no function '{function_name}' (has: "
                              f"{', '.join(program.functions)})")
    fn = program.functions[function_name]
    return LoadedPackage(path=path, program=program, function=fn,
                         spec_version=spec.specificationVersion,
                         input_names=list(fn.inputs), output_names=[v.name for v in fn.outputs],
                         weights_dir=wdir)
