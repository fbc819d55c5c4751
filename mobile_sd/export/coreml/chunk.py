"""UNet chunking: split one ML Program into ``UnetChunk1`` / ``UnetChunk2`` packages.

An iPhone loads at most ~1 GB of weights per model on the Neural Engine (ane.md E7), so
Apple's Swift package accepts the UNet as two chunks. Its contract (Unet.swift): chunk 1
takes the UNet's inputs; chunk 2 takes chunk 1's outputs merged with the original inputs, by
name, and returns ``noise_pred``.

The cut is coremltools' ``ct.models.utils.bisect_model`` (present in coremltools 9.0): the
first non-const op where the cumulative weight size passes half, with one consumer; every
value crossing the cut becomes an output of chunk 1 and an input of chunk 2 **under the same
MIL name** (``add_75_cast_fp16``...), fp16 values cast to fp32 at the boundary. Inputs of the
original model that chunk 2 still reads keep their names (``timestep``...). This module runs
it without its output check (that calls ``predict``, macOS only), renames the packages to the
Swift names and checks the chain by name:

* chunk 1's inputs are exactly the original inputs;
* every chunk 2 input is a chunk 1 output or an original input, with the same shape;
* chunk 2's outputs are the original outputs.

Example (not run by the tests: it needs real artifacts)::

    chunks = bisect_package(out / "Unet.mlpackage", out)
    [c.path.name for c in chunks]
    # -> ['UnetChunk1.mlpackage', 'UnetChunk2.mlpackage']
"""
from __future__ import annotations

import contextlib
import gc
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mobile_sd.errors import ExportError

CHUNK_NAMES = ("UnetChunk1", "UnetChunk2")


@dataclass(frozen=True)
class Chunk:
    """One saved chunk: its package, I/O (as ``describe_io`` gives it) and weight bytes."""

    path: Path
    inputs: list[dict]
    outputs: list[dict]
    weight_bytes: int

    def io(self) -> dict:
        return {"inputs": self.inputs, "outputs": self.outputs}


def needs_chunking(package: Path, max_bytes: int | None) -> bool:
    """Whether the package's weights exceed ``max_bytes`` (``None``: chunking is off)."""
    from mobile_sd.export.coreml.inspect import weight_bytes

    return max_bytes is not None and weight_bytes(package) > max_bytes


def bisect_package(package: Path, out_dir: Path, max_bytes: int | None = None) -> list[Chunk]:
    """Split ``package`` into ``out_dir/UnetChunk{1,2}.mlpackage``; remove ``package``.

    ``max_bytes``: each chunk must fit, else ExportError (the Swift package takes two chunks,
    no more). Nothing is left under the chunk names if anything fails.
    """
    import coremltools as ct

    from mobile_sd.export.coreml.inspect import describe_io
    from mobile_sd.export.coreml.progress import coremltools_progress
    from mobile_sd.export.coreml.reproducible import make_reproducible

    package, out_dir = Path(package), Path(out_dir)
    original = describe_io(package)
    work = Path(tempfile.mkdtemp(prefix=".chunks-", dir=out_dir))
    finals = [out_dir / f"{name}.mlpackage" for name in CHUNK_NAMES]
    try:
        with _coremltools_log_level(logging.WARNING), coremltools_progress():
            ct.models.utils.bisect_model(str(package), str(work), check_output_correctness=False)
        gc.collect()
        stem = package.stem
        for i, final in enumerate(finals, start=1):
            (work / f"{stem}_chunk{i}.mlpackage").rename(final)
            make_reproducible(final)
        chunks = [_chunk(path) for path in finals]
        check_chain(original, chunks)
        _check_sizes(chunks, max_bytes)
    except BaseException as exc:
        for final in finals:
            shutil.rmtree(final, ignore_errors=True)
        if isinstance(exc, OSError):  # disk full / unwritable while saving a chunk
            from mobile_sd.export.coreml.convert import disk_error

            raise disk_error(exc, out_dir / CHUNK_NAMES[0]) from exc
        if isinstance(exc, ValueError):  # bisect_model: no single-consumer op to cut at
            raise ExportError(f"{package.name}: coremltools could not split the UNet ({exc}); "
                              "palettize it below unet_chunk_max_bytes instead") from exc
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(package)
    return chunks


def _chunk(path: Path) -> Chunk:
    from mobile_sd.export.coreml.inspect import describe_io, weight_bytes

    io = describe_io(path)
    strip = lambda fs: [{k: f[k] for k in ("name", "shape", "dtype")} for f in fs]  # noqa: E731
    return Chunk(path, strip(io["inputs"]), strip(io["outputs"]), weight_bytes(path))


def check_chain(original: dict, chunks: list[Chunk]) -> None:
    """Raise ExportError unless the chunks compose by name into the original model."""
    first, second = chunks
    names = lambda fs: {f["name"]: f["shape"] for f in fs}  # noqa: E731
    inputs, outputs = names(original["inputs"]), names(original["outputs"])
    problems = []
    if names(first.inputs) != inputs:
        problems.append(f"chunk 1 inputs {sorted(names(first.inputs))} != model inputs "
                        f"{sorted(inputs)}")
    available = {**inputs, **names(first.outputs)}
    for name, shape in names(second.inputs).items():
        if available.get(name, shape) != shape or name not in available:
            problems.append(f"chunk 2 input {name!r} {shape} is neither a chunk 1 output nor a "
                            "model input of that shape")
    if names(second.outputs) != outputs:
        problems.append(f"chunk 2 outputs {sorted(names(second.outputs))} != model outputs "
                        f"{sorted(outputs)}")
    if problems:
        raise ExportError("UNet chunks do not chain (Swift contract: chunk 2 takes chunk 1's "
                          "outputs plus the original inputs by name): " + "; ".join(problems))


def _check_sizes(chunks: list[Chunk], max_bytes: int | None) -> None:
    if max_bytes is None:
        return
    big = [f"{c.path.name} {c.weight_bytes / 1e6:.0f} MB" for c in chunks
           if c.weight_bytes > max_bytes]
    if big:
        raise ExportError(f"UNet chunks still exceed unet_chunk_max_bytes "
                          f"({max_bytes / 1e6:.0f} MB): {', '.join(big)}; the Swift package "
                          "loads two chunks at most: palettize the UNet (compression nbits 6 "
                          "or less) or raise unet_chunk_max_bytes")


@contextlib.contextmanager
def _coremltools_log_level(level: int):
    """bisect_model logs every step at INFO; keep the progress bar clean, then restore."""
    logger = logging.getLogger("coremltools")
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)
