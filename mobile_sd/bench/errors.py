"""Typed faults of the latency harness.

Every fault names the device (serial / UDID / "this machine") and says what to do. They all
derive from :class:`mobile_sd.errors.DeviceError` (CLI exit code 2), except a bad manifest,
which is a :class:`mobile_sd.errors.ParityError` like the parity harness's.

Faults raised while a runner was running may carry what it printed so far (``stdout``,
``stderr``), so the harness can keep the iterations that finished and mark the result
``partial``.
"""
from __future__ import annotations

from mobile_sd.errors import DeviceError, ParityError


class BenchManifestError(ParityError):
    """``manifest.json`` of an artifact folder is missing, unreadable or malformed."""


class DeviceNotFoundError(DeviceError):
    """No device with this serial / UDID is connected (or none at all)."""


class DeviceUnauthorizedError(DeviceNotFoundError):
    """The device is connected but has not accepted this computer's debugging key."""


class DeviceLostError(DeviceError):
    """The device went away (unplugged, offline, rebooted) in the middle of a session."""


class InsufficientStorageError(DeviceError):
    """The device has not enough free storage for an artifact."""


class ArtifactMissingOnDeviceError(DeviceError):
    """A file the run needs (model, runner binary, ETDump) is not on the device."""


class RunnerError(DeviceError):
    """Base of runner faults; keeps the runner's partial output for partial results."""

    def __init__(self, message: str, stdout: str = "", stderr: str = "") -> None:
        super().__init__(message)
        self.stdout = stdout
        self.stderr = stderr


class RunnerCrashError(RunnerError):
    """The runner was killed by a signal (segfault, abort, out-of-memory kill)."""


class RunnerTimeoutError(RunnerError):
    """The runner did not finish within the timeout."""


class RunnerFailedError(RunnerError):
    """The runner exited with an error code (bad flags, model it cannot load...)."""
