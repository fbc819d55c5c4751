"""Atomic output folders, output locks, and file hashing.

Exports never leave a half-written artifact: everything is written into a temporary sibling
folder which is renamed onto the final name only when complete.

``--force`` only ever replaces what mobile-sd wrote itself: an existing output is replaced only
if it carries our marker (:data:`MARKERS`: an export folder's ``manifest.json`` with our schema,
a model folder's ``model_index.json`` with its ``_mobile_sd`` block), never a symlink, a plain
file or a folder without the marker, and never an output that is, holds, or sits inside a
protected folder (the model being exported). One writer per output: :func:`output_lock` holds an
exclusive ``flock`` on ``.NAME.lock`` beside it; a second writer fails naming the holder's pid.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from mobile_sd.errors import OutputDirError

#: kind -> (marker file, key, what it is). The manifest schema is ``mobile-sd/manifest/v1``.
MARKERS = {
    "export": ("manifest.json", "schema", ("an export folder (manifest.json with schema "
                                           "mobile-sd/manifest/...)")),
    "model": ("model_index.json", "_mobile_sd", ("a model folder written by `mobile-sd init` "
                                                 "(model_index.json with a _mobile_sd block)")),
}


#: OS errors that mean "this output cannot be written here" (others are re-raised as they are).
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
                errno.ENOTDIR, errno.EISDIR, errno.EEXIST}


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


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file here (0644 under the usual umask 022)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def is_our_output(path: Path, kind: str | None) -> bool:
    """True if ``path`` is a folder mobile-sd wrote (of ``kind``; any kind if None)."""
    kinds = MARKERS if kind is None else {kind: MARKERS[kind]}
    for marker, key, _ in kinds.values():
        file = path / marker
        if path.is_symlink() or not path.is_dir() or not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            continue
        value = data.get(key) if isinstance(data, dict) else None
        if (key == "schema" and isinstance(value, str) and value.startswith("mobile-sd/manifest/")
                or key == "_mobile_sd" and isinstance(value, dict)):
            return True
    return False


def refuse_overlap(out: str | os.PathLike, protected: str | os.PathLike | None,
                   what: str = "the model folder") -> None:
    """:class:`OutputDirError` if ``out`` is ``protected``, holds it or is inside it (symlinks
    resolved): writing or replacing it would touch the user's files."""
    if protected is None:
        return
    o, p = Path(out).resolve(), Path(protected).resolve()
    if o == p or p in o.parents or o in p.parents:
        relation = "is" if o == p else "is inside" if p in o.parents else "contains"
        raise OutputDirError(f"--out {out} {relation} {what} {protected}; refusing to write "
                             "there: choose an --out outside it")


def make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and missing parents; return the ones created (to undo on failure)."""
    missing = []
    for candidate in [folder, *folder.parents]:
        if candidate.exists() or candidate.is_symlink():
            if not candidate.is_dir():
                raise OutputDirError(f"cannot create output folder {folder}: {candidate} is a "
                                     "file, not a folder; choose an --out whose parent is a "
                                     "folder")
            break
        missing.append(candidate)
    for candidate in reversed(missing):
        try:
            candidate.mkdir()
        except OSError as exc:
            remove_created(missing)
            raise OutputDirError(f"cannot create output folder {candidate}: {exc.strerror}; "
                                 "choose a writable --out") from None
    return missing


def remove_created(created: Iterable[Path]) -> None:
    """Remove folders :func:`make_parents` created, deepest first, if still empty."""
    for folder in sorted(created, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _check_writable(parent: Path) -> None:
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputDirError(f"output folder {parent} is not writable (read-only file system or "
                             "permissions); choose another --out")


def lock_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.lock")


@contextlib.contextmanager
def output_lock(final: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``final`` (``.NAME.lock`` beside it, removed after).

    Each try re-checks that the locked file is still the one at the path: a holder unlinks it
    on release, and a waiter that opened the old file must not think it holds the lock.
    """
    path = lock_path(Path(final).absolute())
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise output_error(exc, Path(final)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputDirError(f"{final} is being written by another mobile-sd process (pid "
                                 f"{holder}, lock {path}); wait for it or choose another --out"
                                 ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM during a short critical section (the rename swap), then deliver them:
    an interrupt between the two renames would leave neither the old nor the new output."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    names = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in names}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in caught:
            os.kill(os.getpid(), sig)


def output_error(exc: OSError, final: Path) -> OutputDirError:
    if exc.errno == errno.ENOSPC:
        return OutputDirError(f"no space left while writing {final}; nothing was kept. "
                              "Free disk space or choose another --out")
    if exc.errno == errno.EROFS:
        return OutputDirError(f"cannot write {final}: read-only file system; nothing was "
                              "kept. Choose another --out")
    return OutputDirError(f"cannot write {final}: {exc.strerror or exc}; nothing was kept. "
                          "Choose another --out")


def check_replaceable(final: str | os.PathLike, overwrite: bool, kind: str | None) -> None:
    """Fail early (before minutes of work) if :func:`atomic_output_dir` would refuse ``final``."""
    _check_replaceable(Path(final).absolute(), overwrite, kind)


def _check_replaceable(final: Path, overwrite: bool, kind: str | None) -> None:
    if final.is_symlink():
        raise OutputDirError(f"--out {final} is a symbolic link; refusing to replace it: "
                             "pass the real folder or choose another --out")
    if not final.exists() or (final.is_dir() and not any(final.iterdir())):
        return
    if not overwrite:
        raise OutputDirError(f"output folder {final} already exists and is not empty; "
                             "pass --force to replace it or choose another --out")
    if not is_our_output(final, kind):
        what = "mobile-sd output" if kind is None else MARKERS[kind][2]
        found = "a file" if not final.is_dir() else "a folder"
        raise OutputDirError(f"--force refused: {final} is {found} that is not {what}; "
                             "mobile-sd replaces only what it wrote. Choose another --out")


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` onto ``final``, the previous output (checked ours) removed after."""
    with deferred_signals():
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
        else:
            tmp.rename(final)
            return
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output_dir(final: str | os.PathLike, overwrite: bool = False, kind: str | None = None,
                      protect: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a temp folder next to ``final``; rename it to ``final`` only if the body succeeds.

    On any exception (including KeyboardInterrupt) the temp folder is removed, so ``final`` is
    either the complete new output, or untouched. ``overwrite`` replaces an existing ``final``
    only if it is ours (``kind``: a key of :data:`MARKERS`; None accepts any of them); never a
    ``protect``-ed folder (the model) or anything around it. OS errors (no space, read-only file
    system...) become an :class:`OutputDirError`; the output is locked (:func:`output_lock`).

    Example (not run by the tests: it needs real artifacts)::

        with atomic_output_dir("out/bundle", kind="export") as tmp:
            (tmp / "manifest.json").write_text("{}")
    """
    final = Path(final).absolute()
    refuse_overlap(final, protect)
    created = make_parents(final.parent)
    tmp, done = None, False
    try:
        _check_writable(final.parent)
        with output_lock(final):
            _check_replaceable(final, overwrite, kind)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
            # mkdtemp makes 0700; the output is as readable as its parent (never group/world-writable).
            tmp.chmod(final.parent.stat().st_mode & 0o755 | 0o700)
            yield tmp
            _check_replaceable(final, overwrite, kind)   # still ours (a non-mobile-sd writer?)
            _swap_in(tmp, final)
            done = True
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        raise output_error(exc, final) from exc
    finally:
        if not done:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            remove_created(created)
