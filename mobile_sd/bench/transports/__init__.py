"""Benchmark targets and how ``--target`` strings name them.

==================  =============================================================
``local``/``host``  this machine, Python runner (ExecuTorch / onnxruntime)
``adb[:SERIAL]``    an Android phone, ExecuTorch ``executor_runner`` (``--runner``)
``ios[:UDID]``      an iPhone with the mobile-sd benchmark app (macOS + Xcode)
``mac[:UNITS]``     Core ML on this Mac; UNITS = CPU_ONLY | CPU_AND_GPU | CPU_AND_NE | ALL
==================  =============================================================

>>> parse_target("adb:R5CT32ABCDE")
Target(kind='adb', device='R5CT32ABCDE', compute_units=None)
>>> parse_target("mac:cpu_and_ne").compute_units
'CPU_AND_NE'
"""
from __future__ import annotations

from dataclasses import dataclass

from mobile_sd.bench.transports.base import RunResult, Transport
from mobile_sd.errors import InvalidArgumentError

KINDS = ("local", "adb", "ios", "mac")


@dataclass(frozen=True)
class Target:
    """A parsed ``--target``: kind, device serial/UDID, Core ML compute units."""

    kind: str
    device: str | None = None
    compute_units: str | None = None

    def __str__(self) -> str:
        suffix = self.device or self.compute_units
        return f"{self.kind}:{suffix}" if suffix else self.kind


def parse_target(text: str) -> Target:
    """``Target`` of a ``--target`` string; ``InvalidArgumentError`` listing the valid forms."""
    from mobile_sd.bench.runner import COMPUTE_UNITS

    kind, _, rest = text.strip().partition(":")
    kind = {"host": "local"}.get(kind.lower(), kind.lower())
    if kind not in KINDS or (kind == "local" and rest):
        raise InvalidArgumentError(f"unknown --target {text!r}; use local (or host), "
                                   "adb[:SERIAL], ios[:UDID] or "
                                   "mac[:CPU_ONLY|CPU_AND_GPU|CPU_AND_NE|ALL]")
    if kind == "mac":
        units = rest.upper() or "ALL"
        if units not in COMPUTE_UNITS:
            raise InvalidArgumentError(f"unknown compute units {rest!r} in --target {text!r}; "
                                       f"use one of {', '.join(COMPUTE_UNITS)}")
        return Target("mac", None, units)
    return Target(kind, rest or None, "ALL" if kind == "ios" else None)


def open_transport(target: Target) -> Transport:
    """A transport for ``target``. Apple targets raise ``BackendUnavailableError`` off macOS."""
    if target.kind == "local":
        from mobile_sd.bench.transports.local import LocalTransport

        return LocalTransport()
    if target.kind == "adb":
        from mobile_sd.bench.transports.adb import AdbTransport

        return AdbTransport(target.device)
    from mobile_sd.bench.transports.ios import DevicectlTransport, MacCoreMLTransport

    return MacCoreMLTransport() if target.kind == "mac" else DevicectlTransport(target.device)


__all__ = ["KINDS", "RunResult", "Target", "Transport", "open_transport", "parse_target"]
