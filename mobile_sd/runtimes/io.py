"""What every runtime shares: the runner interface, the I/O check against the manifest, and the
two outcomes that are not a numerical verdict (cannot run here; crashed while running).

A runner executes one file: ``run(list of tensors in declared input order) -> list of tensors``.
Before anything runs, the I/O the loaded program declares (names where the format keeps them,
shapes, dtypes) is compared with ``manifest.json``: a mismatch is a :class:`ParityError`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mobile_sd.errors import ParityError
from mobile_sd.manifest import TensorEntry


class RuntimeSkip(Exception):
    """This artifact cannot run on this host; ``reason`` says why (reported as *skipped*)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ArtifactRunError(RuntimeError):
    """The artifact loaded but its runtime failed while running it (a failed check)."""


class FileRunner:
    """One runnable file: ``run(list of tensors in declared input order) -> list of tensors``."""
    runtime: str
    path: Path
    inputs: tuple[TensorEntry, ...]
    outputs: tuple[TensorEntry, ...]

    def run(self, tensors: list) -> list:  # pragma: no cover - every runtime overrides it
        raise NotImplementedError


def check_io(where: str, kind: str, declared: Sequence[TensorEntry],
             found: Sequence[tuple[str | None, Sequence, str]]) -> None:
    """Compare the ``found`` I/O of a loaded program with the manifest's ``declared`` I/O.

    ``found``: (name or None when the format keeps no names, shape (ints, or str/None for a
    dynamic dim), dtype). Raises ParityError listing every difference.
    """
    problems = []
    if len(found) != len(declared):
        problems.append(f"{len(found)} {kind}s in the file, {len(declared)} in manifest.json "
                        f"({', '.join(d.name for d in declared)})")
    for want, (name, shape, dtype) in zip(declared, found):
        label = f"{kind} {want.name!r}"
        if name is not None and name != want.name:
            problems.append(f"{kind} named {name!r} in the file where manifest.json has {want.name!r}")
        static = [s if isinstance(s, int) else None for s in shape]
        if len(static) != len(want.shape) or any(s is not None and s != w
                                                 for s, w in zip(static, want.shape)):
            problems.append(f"{label} has shape {list(shape)} in the file, "
                            f"{list(want.shape)} in manifest.json")
        if dtype != want.dtype:
            problems.append(f"{label} is {dtype} in the file, {want.dtype} in manifest.json")
    if problems:
        raise ParityError(f"{where}: I/O differs from manifest.json: {'; '.join(problems)}. "
                          "The file and its manifest do not belong together: re-export the folder")
