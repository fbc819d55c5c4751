"""Errors of the Core ML (MIL) host runtime: one line, naming the package (and op) at fault."""
from __future__ import annotations

from mobile_sd.errors import MobileSDError


class MilRuntimeError(MobileSDError):
    """A Core ML package cannot be loaded or executed by the MIL interpreter."""


class UnsupportedMilOpError(MilRuntimeError):
    """The program uses an op type the interpreter has no kernel for (never skipped silently)."""

    def __init__(self, op_type: str, op_name: str, path=None, recipe: str | None = None):
        self.op_type, self.op_name, self.path, self.recipe = op_type, op_name, path, recipe
        where = f" in {path}" if path else ""
        rec = f" (recipe {recipe})" if recipe else ""
        super().__init__(f"unsupported MIL op type '{op_type}' (op '{op_name}'){where}{rec}: "
                         f"add a kernel for it to mobile_sd.runtimes.coreml.kernels.REGISTRY")
