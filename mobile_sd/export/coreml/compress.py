"""The compression phase of the Core ML flow: the recipe's config -> compressed ``MLModel``.

The work is :func:`mobile_sd.compress.coreml_apply.compress_mlmodel` (our fast k-means LUTs
through coremltools' ``palettize_weights(mode="custom")``, int8 / int4 through
``linear_quantize_weights``). This module adds what the export needs around it:

* ``op_name`` keys may omit the ``_to_fp16`` suffix fp16 programs add to weight names, so one
  recipe works for fp16 and fp32 exports (``p_unet_conv_out_weight`` matches
  ``p_unet_conv_out_weight_to_fp16``);
* a report for the manifest: compression ops per kind, LUT bits, the specs asked for, seconds.

Example (not run by the tests: it needs real artifacts)::

    mlmodel, report = compress_model(mlmodel, recipe.component("unet").compression)
    report["ops_by_kind"], report["lut_nbits"]
    # -> ({'palettize': 212, 'linear_quantize': 0}, {'6': 212})
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

from mobile_sd.compress.config import CompressionConfig

FP16_SUFFIX = "_to_fp16"


def compress_model(mlmodel: Any, config: CompressionConfig) -> tuple[Any, dict]:
    """``(compressed MLModel, manifest report)``; unknown op names are RecipeError."""
    from mobile_sd.compress.coreml_apply import compress_mlmodel, weight_and_op_names
    from mobile_sd.export.coreml.progress import coremltools_progress

    start = time.perf_counter()
    if config.op_name:
        config = with_program_names(config, set(weight_and_op_names(mlmodel)))
    with coremltools_progress():   # coremltools' bars only on a terminal
        mlmodel = compress_mlmodel(mlmodel, config)
    return mlmodel, _report(mlmodel, config, time.perf_counter() - start)


def with_program_names(config: CompressionConfig, names: set[str]) -> CompressionConfig:
    """``config`` with each ``op_name`` key spelled as the program spells it (fp16 suffix on
    or off); keys matching neither spelling are kept, for the caller's name check to report.

    >>> cfg = CompressionConfig(op_name={"p_w": None, "p_v_to_fp16": None})
    >>> sorted(with_program_names(cfg, {"p_w_to_fp16", "p_v"}).op_name)
    ['p_v', 'p_w_to_fp16']
    """
    def spelled(key: str) -> str:
        bare = key.removesuffix(FP16_SUFFIX)
        return next((k for k in (key, bare + FP16_SUFFIX, bare) if k in names), key)

    return dataclasses.replace(config, op_name={spelled(k): v for k, v in config.op_name.items()})


def _report(mlmodel: Any, config: CompressionConfig, seconds: float) -> dict:
    from mobile_sd.export.coreml.inspect import compression_ops

    ops = compression_ops(mlmodel)
    kinds = {"palettize": ops["constexpr_lut_to_dense"],
             "linear_quantize": ops["constexpr_affine_dequantize"]
             + ops["constexpr_blockwise_shift_scale"]}
    return {"ops": sum(kinds.values()), "ops_by_kind": kinds,
            "lut_nbits": {str(k): v for k, v in ops["lut_nbits"].items()},
            "requested": {where: spec.describe() for where, spec in config.specs()},
            "weight_threshold": config.weight_threshold, "seconds": round(seconds, 2)}
