"""Facts about the machine and tool versions, recorded in every manifest and benchmark."""
from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import resource
import subprocess
import threading
from pathlib import Path

TOOLS = ("mobile-sd", "torch", "executorch", "coremltools", "diffusers", "transformers",
         "numpy", "onnx", "onnxruntime", "onnxscript", "onnxsim", "torchao", "safetensors")


def tool_versions() -> dict[str, str | None]:
    """Installed versions of the packages that shape an export (None when not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in TOOLS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_info() -> dict[str, object]:
    """CPU model, core count, memory and OS of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {"system": platform.system(), "release": platform.release(),
            "machine": platform.machine(), "cpu": cpu, "cores": os.cpu_count(),
            "memory_gb": mem_gb}


def git_sha(repo: str | os.PathLike | None = None) -> str | None:
    """Current git commit of the repository holding ``repo`` (or this package), if any."""
    where = Path(repo) if repo else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], check=True,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux/macOS).

    On Linux this reads VmHWM: ``ru_maxrss`` survives ``exec``, so a child process would
    report its parent's peak when that was higher.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 2**20 if platform.system() == "Darwin" else peak / 1024


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``).

    Between full-size components the freed weights of the previous one otherwise stay in the
    process (glibc keeps freed chunks below its mmap threshold), and the next lowering's peak
    adds to them. Elsewhere than glibc this only collects garbage.
    """
    import gc

    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (looked up once: ``find_library`` runs ldconfig)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c") if platform.system() == "Linux" else None
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):   # musl and others: no malloc_trim
        return None


class PeakRss:
    """Samples this process's RSS in a thread (the kernel's peak cannot be reset per export)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        process = psutil.Process()
        while True:
            self.peak_mb = max(self.peak_mb, process.memory_info().rss / 2**20)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
