"""Atomic output folders and file hashing.

Exports never leave a half-written artifact: everything is written into a temporary sibling
folder which is renamed onto the final name only when complete.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from mobile_sd.errors import OutputDirError


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file, or of every file in a folder (e.g. an .mlpackage) in sorted order."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def size_bytes(path: str | os.PathLike) -> int:
    """Size of a file, or the total size of the files in a folder."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _check_writable_parent(final: Path) -> None:
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(f"cannot create output folder {parent}: {exc.strerror}; "
                             "choose a writable --out") from exc
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputDirError(f"output folder {parent} is not writable; choose another --out "
                             "or fix its permissions")


@contextlib.contextmanager
def atomic_output_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder next to ``final``; rename it to ``final`` only if the body succeeds.

    On any exception (including KeyboardInterrupt) the temp folder is removed, so ``final`` is
    either the complete new output, or untouched. ``ENOSPC`` becomes an :class:`OutputDirError`.

    Example (not run by the tests: it needs real artifacts)::

        with atomic_output_dir("out/bundle") as tmp:
            (tmp / "manifest.json").write_text("{}")
    """
    final = Path(final).absolute()
    _check_writable_parent(final)
    if final.exists() and not overwrite:
        if not (final.is_dir() and not any(final.iterdir())):
            raise OutputDirError(f"output folder {final} already exists and is not empty; "
                                 "pass --force to replace it or choose another --out")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    # mkdtemp makes 0700; the output is as readable as its parent (never group/world-writable).
    tmp.chmod(final.parent.stat().st_mode & 0o755 | 0o700)
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise OutputDirError(f"no space left while writing {final}; nothing was kept. "
                                 "Free disk space or choose another --out") from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
