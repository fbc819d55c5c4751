"""Exception types of mobile-sd.

Every error a user can cause derives from :class:`MobileSDError`; the CLI prints its message
on one line and exits with code 2. Messages name the file / tensor / op at fault and say what
to do about it.
"""
from __future__ import annotations


class MobileSDError(Exception):
    """Base class: a problem with the user's input or environment (CLI exit code 2)."""


class SpecError(MobileSDError):
    """An architecture spec or recipe is unknown or invalid (bad name, unknown key, bad value)."""


class RecipeError(SpecError):
    """An export recipe is invalid or asks for something the target cannot do."""


class ModelFolderError(MobileSDError):
    """A model folder is missing, incomplete or laid out wrongly."""


class WeightsError(ModelFolderError):
    """A weights file is missing, truncated, pickle-only, or does not match the config."""


class TensorMismatchError(WeightsError):
    """A tensor's name or shape does not match what the config builds."""


class InvalidArgumentError(MobileSDError):
    """A command-line or API argument has an invalid value (steps, guidance, paths...)."""


class ExportError(MobileSDError):
    """An export failed: unsupported op, unwritable output, missing backend SDK..."""


class UnsupportedOpError(ExportError):
    """An op that no selected backend supports; the message names it and where it comes from."""


class BackendUnavailableError(ExportError):
    """A backend / SDK / runtime needed for this step is not installed or not on this platform."""


class OutputDirError(ExportError):
    """The output directory cannot be written (permissions, disk full, exists and not --force)."""


class ExportInterruptedError(ExportError):
    """An export was interrupted (Ctrl-C); the output folder was left as it was before."""


class ProgramLoadError(ExportError):
    """The host's ExecuTorch runtime refuses to load a program just exported (a delegate
    rejected a node at init); nothing is written."""


class CalibrationError(ExportError):
    """Calibration data is missing or does not match the model's inputs."""


class ParityError(MobileSDError):
    """A parity run cannot start: missing manifest, sha256 mismatch, I/O differs from manifest."""


class ManifestError(ParityError):
    """An export folder's ``manifest.json`` is missing, malformed, or does not match its files."""


class DeviceError(MobileSDError):
    """A benchmark device is missing, lost, out of storage, or its runner crashed / timed out."""
