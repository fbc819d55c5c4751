"""Parsers for what ``adb`` and ExecuTorch's ``executor_runner`` print, and fault mapping.

Formats (recorded examples in ``tests/data/bench/``):

- ``adb devices -l``: ``SERIAL  STATE  usb:1-1 product:X model:Y device:Z transport_id:N``.
- toybox ``df``: a header with ``1K-blocks`` and one row per filesystem; old toolbox ``df``
  prints ``Size Used Free Blksize`` with human sizes (``13.4G``).
- ``executor_runner`` logs through ExecuTorch's posix PAL, on stderr:
  ``I 00:00:01.234567 executorch:executor_runner.cpp:NNN] <message>``. Messages used:
  ``Model loaded in %f ms.`` and ``Iteration %u of %u: %f ms`` (recent releases only) and
  ``Model executed successfully %u time(s) in %f ms.`` (all releases since 0.4).
- toybox ``time -v`` (stderr): ``Real time (s): 1.234``, ``Max RSS (KiB): 123456``.
"""
from __future__ import annotations

import re

from mobile_sd.bench import errors as E

RC_MARKER = "__MOBILE_SD_RC="

_ITER = re.compile(r"Iteration (\d+) of (\d+): ([0-9.]+) ms")
_TOTAL = re.compile(r"Model executed successfully (\d+) time\(s\) in ([0-9.]+) ms")
_LOAD = re.compile(r"Model loaded in ([0-9.]+) ms")
_RSS = re.compile(r"Max RSS \(KiB\): (\d+)")
_RC = re.compile(re.escape(RC_MARKER) + r"(\d+)")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_devices(text: str) -> list[dict]:
    """Rows of ``adb devices -l``: serial, state and the ``key:value`` fields."""
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 2 or line.startswith(("List of devices", "*")):
            continue
        row = {"serial": parts[0], "state": parts[1]}
        row.update(p.split(":", 1) for p in parts[2:] if ":" in p)
        rows.append(row)
    return rows


def parse_df_free_bytes(text: str) -> int | None:
    """Available bytes from the last row of ``df PATH`` (toybox or old toolbox output)."""
    lines = [l for l in text.strip().splitlines() if l.strip()]
    if len(lines) < 2:
        return None
    header, row = lines[0].split(), lines[-1].split()
    if "Available" in header and len(row) >= 4:
        block = 512 if "512-blocks" in header else 1024
        return int(row[3]) * block if row[3].isdigit() else _human(row[3])
    if "Free" in header and len(row) >= 4:  # toolbox: Filesystem Size Used Free Blksize
        return _human(row[3])
    return None


def _human(value: str) -> int | None:
    match = re.fullmatch(r"([0-9.]+)([KMGT]?)", value)
    return int(float(match[1]) * _UNITS[match[2]]) if match else None


def parse_executor_runner(text: str) -> dict:
    """Load time, per-iteration times (if printed) and the total of an executor_runner run."""
    total = _TOTAL.search(text)
    load = _LOAD.search(text)
    rss = _RSS.search(text)
    return {"load_ms": float(load[1]) if load else None,
            "iteration_ms": [float(m[3]) for m in _ITER.finditer(text)],
            "num_executions": int(total[1]) if total else None,
            "total_ms": float(total[2]) if total else None,
            "peak_rss_mb": int(rss[1]) / 1024 if rss else None}


def split_rc(stdout: str) -> tuple[str, int | None]:
    """Remove the exit-code marker line our remote command appends; return (stdout, code)."""
    match = _RC.search(stdout)
    if not match:
        return stdout, None
    return stdout[:match.start()] + stdout[match.end():].lstrip("\n"), int(match[1])


def adb_fault(serial: str, text: str, phase: str, connected: bool) -> E.DeviceError | None:
    """The typed fault that adb's own output describes, or None.

    Before the session is established, a missing/offline device is ``DeviceNotFoundError``;
    after it, the same text means the device went away: ``DeviceLostError``.
    """
    low = text.lower()
    gone = ("no devices/emulators found" in low or "no devices found" in low
            or re.search(r"device '[^']*' not found", low) is not None)
    if "unauthorized" in low:
        return E.DeviceUnauthorizedError(
            f"device {serial} has not authorized this computer: unlock it, accept the "
            "'Allow USB debugging?' prompt, then retry")
    if gone or "device offline" in low:
        what = "is offline" if "offline" in low else "is not connected"
        if connected:
            return E.DeviceLostError(
                f"device {serial} went away during {phase} ({what}): check the cable, keep "
                "the phone awake and rerun; results so far are kept as partial")
        return E.DeviceNotFoundError(
            f"device {serial} {what}: plug it in, enable USB debugging, check `adb devices -l` "
            "and pass its serial as --target adb:SERIAL")
    if any(s in low for s in ("error: closed", "protocol fault", "connection reset",
                              "device disconnected")):
        return E.DeviceLostError(
            f"device {serial} dropped the adb connection during {phase}: check the cable and "
            "rerun; results so far are kept as partial")
    if "no space left on device" in low:
        return E.InsufficientStorageError(
            f"device {serial} ran out of storage during {phase}: free space (e.g. `adb -s "
            f"{serial} shell rm -r /data/local/tmp/<old files>`) and rerun")
    return None


def missing_file(serial: str, text: str, path: str) -> E.ArtifactMissingOnDeviceError | None:
    """``ArtifactMissingOnDeviceError`` if the output says a file does not exist."""
    low = text.lower()
    if any(s in low for s in ("no such file or directory", "does not exist",
                              "inaccessible or not found", ": not found")):
        return missing_error(serial, path)
    return None


def missing_error(serial: str, path: str) -> E.ArtifactMissingOnDeviceError:
    return E.ArtifactMissingOnDeviceError(
        f"{path} is not on device {serial} (it was deleted, or never pushed): rerun the "
        "bench, which pushes it again; check free storage with `adb shell df`")
