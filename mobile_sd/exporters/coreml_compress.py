"""Apply a recipe's three-level :class:`CompressionConfig` to a converted ``MLModel``.

1. Resolve a spec for every weight: the ``const`` ops with more than ``weight_threshold``
   values that feed a compute op, by const name (``op_name``) > consumer op type
   (``op_type``) > ``global_``. An ``op_name`` the program does not have is a RecipeError that
   lists close names; ``p_x_weight`` also matches the fp16 program's ``p_x_weight_to_fp16``.
2. Palettize through coremltools' own pass in ``custom`` mode: coremltools emits the
   ``constexpr_lut_to_dense`` ops (iOS16 form for iOS17, grouped iOS18 form), and its
   ``lut_function`` is our fast k-means / uniform LUT (:func:`palettize_tensor`), called once
   per tensor or per channel group. A grouped spec on a weight whose channels ``group_size``
   does not divide falls back to one LUT for that tensor (reported).
3. int8 / int4 weights through coremltools' ``linear_quantize_weights``.

Returns the compressed model and a report for the manifest: ops per compression kind, LUT bits,
fallbacks, weight SNR (palettized weights, energy-weighted) and seconds.

>>> mlmodel, report = compress_model(mlmodel, recipe.component("unet").compression, "iOS18")  # doctest: +SKIP
>>> report["ops_by_kind"], report["lut_nbits"]                                               # doctest: +SKIP
({'palettize': 212, 'linear_quantize': 0}, {'6': 212})
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from typing import Any

import numpy as np

from mobile_sd.compress.config import CompressionConfig, PalettizeSpec, QuantizeSpec
from mobile_sd.errors import RecipeError

FP16_SUFFIX = "_to_fp16"
# Ops whose const inputs are weights (coremltools compresses the same set).
WEIGHT_CONSUMERS = {"conv", "conv_transpose", "linear", "matmul", "gather", "einsum"}


def weight_consts(mlmodel: Any, threshold: int) -> dict[str, tuple[str, tuple]]:
    """``{const name: (consumer op type, shape)}`` of the weights above ``threshold`` values."""
    from mobile_sd.exporters.coreml_inspect import load_graph

    graph = load_graph(mlmodel)
    found = {}
    for op in graph.ops:
        if op.type != "const":
            continue
        name = op.outputs[0].name
        info = graph.types.get(name)
        users = [c.type for c in graph.consumers.get(name, [])]
        if info is None or not info.dtype.startswith("float") or (info.numel or 0) <= threshold:
            continue
        if users and users[0] in WEIGHT_CONSUMERS:
            found[name] = (users[0], info.shape)
    return found


def resolve_op_names(config: CompressionConfig, names: set[str]) -> CompressionConfig:
    """Map ``op_name`` keys onto the program's const names; unknown ones are RecipeError."""
    mapped = {}
    for key, spec in config.op_name.items():
        mapped[key if key in names or key + FP16_SUFFIX not in names else key + FP16_SUFFIX] = spec
    resolved = dataclasses.replace(config, op_name=mapped)
    resolved.check_names(sorted(names), what="op")
    return resolved


def plan(mlmodel: Any, config: CompressionConfig) -> dict[str, tuple[Any, str, tuple]]:
    """``{const name: (spec, consumer type, shape)}`` for every weight to compress."""
    weights = weight_consts(mlmodel, config.weight_threshold)
    config = resolve_op_names(config, set(weights))
    chosen = {}
    for name, (op_type, shape) in weights.items():
        spec = config.resolve(name, op_type)
        if spec is not None:
            chosen[name] = (spec, op_type, shape)
    return chosen


def compress_model(mlmodel: Any, config: CompressionConfig, target: str):
    """``(compressed MLModel, report)``; see the module docstring."""
    start = time.perf_counter()
    chosen = plan(mlmodel, config)
    stats = _Stats()
    fallbacks = []
    pal, quant = {}, {}
    for name, (spec, op_type, shape) in chosen.items():
        if isinstance(spec, PalettizeSpec):
            spec = _fit_groups(spec, op_type, shape, name, fallbacks)
            pal[name] = _palettizer_config(spec, stats)
        else:
            quant[name] = _quantizer_config(spec)
    mlmodel = _apply(mlmodel, pal, quant)
    return mlmodel, _report(mlmodel, chosen, stats, fallbacks, time.perf_counter() - start)


def _fit_groups(spec: PalettizeSpec, op_type: str, shape: tuple, name: str, fallbacks: list):
    axis = 1 if op_type == "conv_transpose" else 0
    if spec.granularity != "per_grouped_channel" or shape[axis] % spec.group_size == 0:
        return spec
    fallbacks.append(f"{name}: {shape[axis]} channels not divisible by group_size "
                     f"{spec.group_size}: one LUT for the tensor")
    return dataclasses.replace(spec, granularity="per_tensor")


class _Stats:
    """Energy and squared error of every palettized weight (for the SNR in the report)."""

    def __init__(self) -> None:
        self.energy = self.error = 0.0

    def snr_db(self) -> float | None:
        if self.energy == 0:
            return None
        return round(10 * math.log10(self.energy / self.error), 2) if self.error else math.inf


def _palettizer_config(spec: PalettizeSpec, stats: _Stats):
    from coremltools.optimize import coreml as cto

    from mobile_sd.compress.palettize import palettize_tensor

    def lut_function(weight: np.ndarray):
        # coremltools calls this per tensor, or per channel group for grouped LUTs.
        p = palettize_tensor(weight, spec.nbits, mode=spec.mode)
        energy = float(np.square(weight, dtype=np.float64).sum())
        stats.energy += energy
        stats.error += energy / 10 ** (p.snr_db / 10) if math.isfinite(p.snr_db) else 0.0
        return p.lut[0], p.indices.ravel()

    granularity = {"granularity": "per_grouped_channel", "group_size": spec.group_size} \
        if spec.granularity == "per_grouped_channel" else {}
    return cto.OpPalettizerConfig(mode="custom", lut_function=lut_function, weight_threshold=0,
                                  **granularity)


def _quantizer_config(spec: QuantizeSpec):
    from coremltools.optimize import coreml as cto

    block = {"block_size": spec.block_size} if spec.granularity == "per_block" else {}
    return cto.OpLinearQuantizerConfig(mode=spec.mode, dtype=spec.dtype,
                                       granularity=spec.granularity, weight_threshold=0, **block)


def _apply(mlmodel, pal: dict, quant: dict):
    from coremltools.optimize import coreml as cto

    if pal:
        mlmodel = cto.palettize_weights(mlmodel, cto.OptimizationConfig(op_name_configs=pal))
    if quant:
        mlmodel = cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(
            op_name_configs=quant))
    return mlmodel


def _report(mlmodel, chosen: dict, stats: _Stats, fallbacks: list, seconds: float) -> dict:
    from mobile_sd.exporters.coreml_inspect import compression_ops

    ops = compression_ops(mlmodel)
    kinds = {"palettize": ops["constexpr_lut_to_dense"],
             "linear_quantize": ops["constexpr_affine_dequantize"]
             + ops["constexpr_blockwise_shift_scale"]}
    specs = Counter(spec.describe() for spec, _, _ in chosen.values())
    return {"ops": sum(kinds.values()), "ops_by_kind": kinds,
            "lut_nbits": {str(k): v for k, v in ops["lut_nbits"].items()},
            "requested": dict(specs), "fallbacks": fallbacks,
            "palettized_weight_snr_db": stats.snr_db(), "seconds": round(seconds, 2)}
