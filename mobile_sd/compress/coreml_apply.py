"""Apply a CompressionConfig to a converted Core ML ``mlprogram``: our LUTs, coremltools' ops.

Palettization goes through ``coremltools.optimize.coreml.palettize_weights`` with
``OpPalettizerConfig(mode="custom", lut_function=...)``: coremltools walks the MIL program,
picks weights by its own three-level config (which ours maps onto 1:1), splits them into
channel groups for ``per_grouped_channel``, and calls our function once per group with the
fp16 values; it then writes ``constexpr_lut_to_dense`` ops (packed iOS16 form on iOS17,
iOS18 form with uint{n} indices and per-group LUTs on iOS18). Our function runs the fast
near-optimal k-means of :mod:`kmeans` instead of scikit-learn's. Why this route, not snapping
torch weights and recording them with ``mode="unique"``: it works on any converted model
(weights that conversion fused or transposed included, no torch module needed), and
``unique`` re-sorts every weight (np.unique with inverse: ~0.2 us per fp16 weight measured
here, ~3 min for SD-v1.5's UNet) where our clustering takes ~15 ns per weight. Both routes
give identical packages per tensor and per grouped channel (checked on a small model); the
custom route's cost for ``per_grouped_channel`` is one call (~3 ms fixed) per group.
Linear quantization (int8 per channel, int4 per block) delegates to
``linear_quantize_weights`` with the same config.

Example (a converted model ``ml``; see tests/test_palettize.py for a runnable one)::

    ml = ct.convert(torch.export.export(net, args).run_decompositions({}),
                    convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18)
    cfg = CompressionConfig(global_=PalettizeSpec(6),
                            op_type={"linear": QuantizeSpec("int8")},
                            op_name={"p_conv_out_weight_to_fp16": None})
    small = compress_mlmodel(ml, cfg)
    small.save("unet.mlpackage")
    lut_ops_in_package("unet.mlpackage")[0]["nbits"]   # 6
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Optional

import numpy as np

from mobile_sd.compress.config import CompressionConfig, PalettizeSpec, QuantizeSpec, Spec
from mobile_sd.compress.kmeans import kmeans_1d

# Core ML specification version of each deployment target (coremltools' _SPECIFICATION_VERSION)
_TARGETS = {7: "iOS16", 8: "iOS17", 9: "iOS18"}


def compress_mlmodel(mlmodel, config: CompressionConfig | Spec):
    """A compressed copy of ``mlmodel`` (a ``ct.models.MLModel`` mlprogram).

    Raises RecipeError if a spec needs iOS18 and the model targets less, or if
    ``config.op_name`` names neither a weight const nor an op of the model (listing close
    valid names, e.g. ``p_conv_in_weight_to_fp16``).
    """
    import coremltools.optimize.coreml as cto

    config = CompressionConfig.of(config)
    check_config(mlmodel, config)
    palettize = _coreml_config(config, PalettizeSpec, _palettizer_config)
    if palettize is not None:
        mlmodel = cto.palettize_weights(mlmodel, palettize)
    quantize = _coreml_config(config, QuantizeSpec, _quantizer_config)
    if quantize is not None:
        mlmodel = cto.linear_quantize_weights(mlmodel, quantize)
    return mlmodel


def check_config(mlmodel, config: CompressionConfig) -> None:
    """Target and name checks of :func:`compress_mlmodel`, before any work is done."""
    version = mlmodel.get_spec().specificationVersion
    config.check_target(version >= 9, _TARGETS.get(version, f"spec version {version}"))
    if config.op_name:
        config.check_names(weight_and_op_names(mlmodel), what="weight const or op")


def weight_and_op_names(mlmodel) -> list[str]:
    """Names usable in ``op_name``: weight consts first (``p_<param>_to_fp16``), then ops."""
    import coremltools.optimize.coreml as cto

    meta = cto.get_weights_metadata(mlmodel, weight_threshold=0)
    ops = [child.name for m in meta.values() for child in m.child_ops]
    return list(meta) + list(dict.fromkeys(ops))


def coreml_const_name(param_name: str) -> str:
    """The const name the torch.export path gives a parameter in an fp16 mlprogram.

    >>> coreml_const_name("down.0.conv.weight")
    'p_down_0_conv_weight_to_fp16'
    """
    return "p_" + param_name.replace(".", "_") + "_to_fp16"


def kmeans_lut_function(nbits: int):
    """The ``lut_function`` for ``OpPalettizerConfig(mode="custom")``: called with one
    group's values (any shape, fp16 or fp32), returns (lut[2**nbits], flat uint8 indices)."""
    return functools.partial(_kmeans_lut, nbits=nbits)


def _kmeans_lut(values: np.ndarray, nbits: int):
    res = kmeans_1d(values.reshape(1, -1), 1 << nbits)
    return res.lut[0].astype(values.dtype), res.indices[0]


def _coreml_config(config: CompressionConfig, kind: type, make):
    """coremltools' OptimizationConfig for the specs of one ``kind`` (others become None)."""
    import coremltools.optimize.coreml as cto

    if not any(isinstance(spec, kind) for _, spec in config.specs()):
        return None
    threshold = config.weight_threshold

    def convert(spec: Optional[Spec]):
        return make(spec, threshold) if isinstance(spec, kind) else None

    return cto.OptimizationConfig(
        global_config=convert(config.global_),
        op_type_configs={k: convert(v) for k, v in config.op_type.items()},
        op_name_configs={k: convert(v) for k, v in config.op_name.items()})


def _palettizer_config(spec: PalettizeSpec, threshold: int):
    import coremltools.optimize.coreml as cto

    common = dict(granularity=spec.granularity, group_size=spec.group_size,
                  weight_threshold=threshold)
    if spec.mode == "uniform":  # same formula as ours: let coremltools do it
        return cto.OpPalettizerConfig(mode="uniform", nbits=spec.nbits, **common)
    return cto.OpPalettizerConfig(mode="custom", lut_function=kmeans_lut_function(spec.nbits),
                                  **common)


def _quantizer_config(spec: QuantizeSpec, threshold: int):
    import coremltools.optimize.coreml as cto

    return cto.OpLinearQuantizerConfig(mode=spec.mode, dtype=spec.dtype,
                                       granularity=spec.granularity,
                                       block_size=spec.block_size, weight_threshold=threshold)


def lut_ops_in_package(path: str | Path) -> list[dict]:
    """``constexpr_lut_to_dense`` ops of a saved .mlpackage, read from its spec only.

    Each: ``{"name", "nbits", "lut_shape", "indices_shape"}`` (iOS16 form: packed indices,
    ``indices_shape`` is the weight shape; iOS18 form: nbits from the uint{n} indices).
    """
    import coremltools as ct

    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    found = []
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            found += [_lut_op_info(op) for op in block.operations
                      if op.type == "constexpr_lut_to_dense"]
    return found


def _lut_op_info(op) -> dict:
    from coremltools.proto import MIL_pb2

    def dims(tensor_type) -> list[int]:
        return [d.constant.size for d in tensor_type.dimensions]

    name = op.outputs[0].name
    if "indices" in op.inputs:  # iOS18: inputs bound to inline values
        indices = op.inputs["indices"].arguments[0].value.type.tensorType
        lut = op.inputs["lut"].arguments[0].value.type.tensorType
        dtype = MIL_pb2.DataType.Name(indices.dataType)  # e.g. UINT4
        return {"name": name, "nbits": int(dtype.removeprefix("UINT")),
                "lut_shape": dims(lut), "indices_shape": dims(indices)}
    lut = dims(op.attributes["lut"].type.tensorType)
    shape = [int(v) for v in op.attributes["shape"].immediateValue.tensor.ints.values]
    return {"name": name, "nbits": int(math.log2(lut[0])), "lut_shape": lut,
            "indices_shape": shape}


def dense_weights(mlmodel, weight_threshold: int = 2048) -> dict[str, np.ndarray]:
    """Every weight of ``mlmodel`` as a dense array, compressed ones decompressed, keyed by
    their const name without the compression suffix (for SNR reports and tests)."""
    import coremltools.optimize.coreml as cto

    dense = cto.decompress_weights(mlmodel)
    meta = cto.get_weights_metadata(dense, weight_threshold=weight_threshold)
    suffixes = ("_palettized", "_quantized")
    out = {}
    for name, info in meta.items():
        for suffix in suffixes:
            name = name.split(suffix)[0]
        out[name] = np.asarray(info.val)
    return out
