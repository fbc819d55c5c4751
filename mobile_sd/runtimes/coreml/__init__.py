"""Core ML (MIL) runtime for Linux: runs an exported ``.mlpackage`` op by op with torch kernels.

What it is: a reference for the *program's* numerics. coremltools rebuilds the saved ML Program
(weights included) as a MIL ``Program``; every op is executed by a vectorized torch kernel
(``kernels.REGISTRY``), compressed weights (LUT palettes, affine / blockwise int8-int4) are
expanded exactly as the constexpr ops define. In ``typed`` mode each fp16 var is rounded to fp16
after the op that makes it, so fp16 overflow (inf / nan) and underflow appear; ``fp32`` mode
widens everything and isolates conversion error from fp16 loss. ``record=True`` returns every
op's output by name, for locating the first op where an error appears.

What it is not: the Neural Engine's or the GPU's exact arithmetic. The ANE accumulates
convolutions / matmuls in its own fp16-ish formats and order, may fuse ops and choose different
softmax / norm implementations; the GPU may accumulate in fp32; Core ML may also run parts on
the CPU in fp32. Kernels here compute in fp32 and round only op outputs. Expect agreement with a
device to within fp16 noise, not bit-exactness; always confirm on a device before shipping.

Example (not run by the tests: it needs real artifacts)::

    from mobile_sd.runtimes.coreml import MilModel
    model = MilModel("out/Unet.mlpackage", mode="typed")
    model.predict({"sample": x, "timestep": t, "encoder_hidden_states": h})["noise_pred"]
"""
from mobile_sd.runtimes.coreml.errors import MilRuntimeError, UnsupportedMilOpError
from mobile_sd.runtimes.coreml.interpreter import (MODES, OpInfo, PreparedProgram, prepare,
                                                   run_prepared, run_program)
from mobile_sd.runtimes.coreml.kernels import REGISTRY, supported_op_types
from mobile_sd.runtimes.coreml.load import LoadedPackage, load_package
from mobile_sd.runtimes.coreml.model import MilModel, first_divergence, psnr

__all__ = ["MilModel", "MilRuntimeError", "UnsupportedMilOpError", "MODES", "OpInfo",
           "PreparedProgram", "prepare", "run_prepared", "run_program", "REGISTRY",
           "supported_op_types", "LoadedPackage", "load_package", "first_divergence", "psnr"]
