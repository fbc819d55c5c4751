"""Which backend takes which precision, and the partitioners that lower to it.

XNNPACK runs on the host (Linux); Core ML ``.pte`` files are produced here but run only on
Apple devices; QNN needs the Qualcomm SDK (see :mod:`mobile_sd.export.executorch.qnn`).
"""
from __future__ import annotations

from mobile_sd.errors import RecipeError

BACKENDS = ("xnnpack", "coreml", "qnn")
PRECISIONS = ("fp32", "fp16", "int8", "int8_dynamic", "int4_weight")
COREML_TARGETS = ("iOS17", "iOS18")

# What each delegate can take. Core ML has no dynamic activation quantization; its "int8" and
# "int4_weight" are weight-only linear quantization (conv + linear) applied by coremltools.
# QNN's HTP runs fp16 or quantized graphs, not fp32.
SUPPORTED = {
    "xnnpack": PRECISIONS,
    "coreml": ("fp32", "fp16", "int8", "int4_weight"),
    "qnn": ("fp16", "int8"),
}

# Per stack.md: what the Core ML delegate path cannot carry, so recipes do it elsewhere.
COREML_LIMITS = (
    "conv palettization: torchao's codebook quantization covers Linear only, and weights "
    "palettized with coremltools.optimize.torch lose it on the ExecuTorch path; palettize "
    "convs with standalone coremltools (.mlpackage) instead",
    "COMPILED_MODEL output fails on Linux: the .pte embeds an uncompiled mlpackage",
)


def check_request(backend: str, precision: str, coreml_target: str, separate_weights: bool) -> None:
    """Raise RecipeError for a combination no backend can export (before any work)."""
    if backend not in BACKENDS:
        raise RecipeError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise RecipeError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision not in SUPPORTED[backend]:
        raise RecipeError(f"backend {backend!r} cannot export precision {precision!r}; it takes "
                          f"{', '.join(SUPPORTED[backend])}")
    if backend == "coreml" and coreml_target not in COREML_TARGETS:
        raise RecipeError(f"unknown coreml_target {coreml_target!r}; choose one of "
                          f"{', '.join(COREML_TARGETS)}")
    if backend == "coreml" and precision == "int4_weight" and coreml_target != "iOS18":
        raise RecipeError("Core ML int4 per-block weights need coreml_target='iOS18'")
    if separate_weights and backend != "xnnpack":
        raise RecipeError(f"separate_weights (.ptd) is supported for xnnpack only: the {backend} "
                          "delegate embeds its weights in its own payload")


def xnnpack_partitioners() -> list:
    """One partitioner taking fp32, fp16, static and dynamic quantized ops alike."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    return [XnnpackPartitioner()]


def coreml_partitioners(precision: str, coreml_target: str) -> list:
    """CoreMLPartitioner with deployment target, compute precision and weight quantization."""
    import coremltools as ct
    from executorch.backends.apple.coreml.compiler import CoreMLBackend
    from executorch.backends.apple.coreml.partition import CoreMLPartitioner

    quant = None
    if precision == "int8":
        quant = {"mode": "linear_symmetric", "dtype": "int8", "granularity": "per_channel"}
    elif precision == "int4_weight":
        quant = {"mode": "linear_symmetric", "dtype": "int4", "granularity": "per_block",
                 "block_size": 32}
    specs = CoreMLBackend.generate_compile_specs(
        minimum_deployment_target=getattr(ct.target, coreml_target),
        compute_precision=ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16,
        op_linear_quantizer_config=quant)
    return [CoreMLPartitioner(compile_specs=specs)]
