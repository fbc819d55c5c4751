"""Staged output files for exports (several files beside each other, all or nothing).

An export writes several files beside each other (``unet.pte``, ``unet.ptd``, ``unet.bpte``,
``unet.etrecord``; ``unet.onnx`` + ``unet.onnx.data``) into a folder that may hold other
components' files, so the whole folder cannot be swapped like
:func:`mobile_sd.utils.files.atomic_output_dir` does. Instead every file is written into a
hidden temp folder next to its destination and renamed into place only after all of them are
complete, the main artifact last; any exception removes the temp folder and whatever was
already moved, so a failed export leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from mobile_sd.errors import OutputDirError
from mobile_sd.utils.files import deferred_signals, make_parents, remove_created


class Staging:
    """Temp paths for final destinations; :meth:`commit` renames them into place.

    The first key of ``destinations`` is the main artifact (``.pte``, ``.onnx``): it is moved
    last, so its presence means every companion file is in place.
    """

    def __init__(self, destinations: dict[str, Path], overwrite: bool,
                 prefix: str = ".msd-export-") -> None:
        self.destinations = {key: Path(path).absolute() for key, path in destinations.items()}
        self.main = next(iter(self.destinations))
        self.prefix = prefix
        self.tmp_dirs: dict[Path, Path] = {}
        self.moved: list[Path] = []
        self.created: list[Path] = []   # parent folders we made: removed again on failure
        try:
            for path in self.destinations.values():
                self.created += _check_destination(path, overwrite)
        except BaseException:
            remove_created(self.created)
            raise

    def path(self, key: str) -> Path:
        """Where to write the file that ends up at ``destinations[key]``."""
        final = self.destinations[key]
        if final.parent not in self.tmp_dirs:
            self.tmp_dirs[final.parent] = Path(tempfile.mkdtemp(prefix=self.prefix,
                                                                dir=final.parent))
        return self.tmp_dirs[final.parent] / final.name

    def commit(self) -> None:
        """Move written files into place, the main artifact last."""
        keys = sorted((k for k in self.destinations
                       if self.destinations[k].parent in self.tmp_dirs and self.path(k).exists()),
                      key=lambda k: k == self.main)
        with deferred_signals():  # an interrupt between renames would leave half the outputs
            for key in keys:
                os.replace(self.path(key), self.destinations[key])
                self.moved.append(self.destinations[key])

    def cleanup(self, failed: bool) -> None:
        """Remove temp folders; after a failure also remove files already moved into place."""
        if failed:
            for path in self.moved:
                path.unlink(missing_ok=True)
        for tmp in self.tmp_dirs.values():
            shutil.rmtree(tmp, ignore_errors=True)
        if failed:
            remove_created(self.created)


def _check_destination(path: Path, overwrite: bool) -> list[Path]:
    """Refuse an unwritable destination; return the parent folders created for it."""
    if path.is_dir():
        raise OutputDirError(f"{path} is a folder; name the file to write (e.g. {path}/out"
                             f"{path.suffix or '.png'}) or choose another output path")
    created = make_parents(path.parent)
    if not os.access(path.parent, os.W_OK | os.X_OK):
        remove_created(created)
        raise OutputDirError(f"output folder {path.parent} is not writable (read-only file "
                             "system or permissions); choose another output path")
    if path.exists() and not overwrite:
        remove_created(created)
        raise OutputDirError(f"{path} already exists; pass overwrite=True to replace it")
    return created


@contextlib.contextmanager
def staged(destinations: dict[str, Path], overwrite: bool = False,
           prefix: str = ".msd-export-") -> Iterator[Staging]:
    """Context manager around :class:`Staging`: commit on success, clean up always."""
    staging = Staging(destinations, overwrite, prefix)
    failed = True
    try:
        yield staging
        staging.commit()
        failed = False
    finally:
        staging.cleanup(failed)


def temp_dir_beside(out: Path) -> Path:
    """A hidden temp folder next to ``out`` (same filesystem, so a rename moves it into place);
    creating it is an :class:`OutputDirError` naming the folder."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.stem}.", dir=out.parent))
    except OSError as exc:
        raise OutputDirError(f"cannot write to {out.parent}: {exc}") from exc
