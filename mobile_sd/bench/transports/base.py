"""The one interface every benchmark target implements, and the subprocess helper they share.

A transport moves files to a device, runs a command there and brings files back. It knows
nothing about models: the drivers (``mobile_sd.bench.runner.drive`` for our Python/app
runner protocol, ``mobile_sd.bench.transports.adb.drive_executor_runner`` for ExecuTorch's
``executor_runner``) use it. Faults are the typed errors of :mod:`mobile_sd.bench.errors`.
"""
from __future__ import annotations

import abc
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

#: Called with ("stdout" | "stderr", line) for every line a command prints, while it runs.
LineCallback = Callable[[str, str], None]


@dataclass(frozen=True)
class RunResult:
    """What a command did: exit code, full output, wall time, and whether it was killed."""

    returncode: int
    stdout: str
    stderr: str
    elapsed_s: float
    timed_out: bool = False


class Transport(abc.ABC):
    """Push / run / pull on one device. ``name`` identifies it in messages and results."""

    name: str = "device"

    @property
    @abc.abstractmethod
    def workdir(self) -> str:
        """Folder on the device where artifacts are pushed and the runner runs."""

    @abc.abstractmethod
    def push(self, local_path: str | os.PathLike, remote_path: str) -> None:
        """Copy a local file or folder to ``remote_path`` on the device."""

    @abc.abstractmethod
    def run(self, argv: Sequence[str], timeout_s: float,
            on_line: LineCallback | None = None) -> RunResult:
        """Run ``argv`` on the device; a timeout raises ``RunnerTimeoutError``."""

    @abc.abstractmethod
    def pull(self, remote_path: str, local_path: str | os.PathLike) -> None:
        """Copy ``remote_path`` from the device to ``local_path``."""

    @abc.abstractmethod
    def device_info(self) -> dict:
        """Model, OS, ABI/chip and free storage of the device, as recorded in results."""

    @abc.abstractmethod
    def free_storage_bytes(self) -> int | None:
        """Free bytes in :attr:`workdir` (None when the device cannot say)."""

    def remote(self, name: str) -> str:
        """Path of ``name`` inside :attr:`workdir`."""
        return f"{self.workdir.rstrip('/')}/{name}"

    def remove(self, remote_path: str) -> None:
        """Delete a pushed file; phones are short of storage, so drivers clean up after use."""

    def close(self) -> None:
        """Release the session (temp folders...)."""


def run_process(argv: Sequence[str], timeout_s: float, on_line: LineCallback | None = None,
                cwd: str | os.PathLike | None = None, env: dict | None = None) -> RunResult:
    """Run a local process, streaming its lines to ``on_line``; kill it on timeout.

    Unlike ``subprocess.run(timeout=...)`` this keeps what was printed before the timeout
    (partial results) and reports lines while they come (progress bars). The child gets its
    own process group so a timeout kills it and its children, and nothing else.
    ``FileNotFoundError`` propagates when ``argv[0]`` does not exist.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, errors="replace", bufsize=1,
                            cwd=cwd, env=env, start_new_session=True)
    chunks: dict[str, list[str]] = {"stdout": [], "stderr": []}

    def pump(stream_name: str, stream) -> None:
        for line in stream:
            chunks[stream_name].append(line)
            if on_line is not None:
                on_line(stream_name, line.rstrip("\n"))

    readers = [threading.Thread(target=pump, args=(n, getattr(proc, n)), daemon=True)
               for n in ("stdout", "stderr")]
    for reader in readers:
        reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        proc.wait()
    for reader in readers:
        reader.join(timeout=5)
    return RunResult(proc.returncode, "".join(chunks["stdout"]), "".join(chunks["stderr"]),
                     time.perf_counter() - start, timed_out)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def signal_name(returncode: int) -> str | None:
    """``"SIGSEGV"`` for -11 (Python's convention) or 139 (a shell's 128 + 11), else None."""
    number = -returncode if returncode < 0 else returncode - 128 if 128 < returncode < 160 else 0
    if not number:
        return None
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"

