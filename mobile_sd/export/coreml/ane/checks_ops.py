"""ANE lint checks E12-E14, C1-C6, N1 (compression, pooling/resize, ints, norms).

Each check yields :class:`~mobile_sd.export.coreml.ane.rules.Finding` for the ops of a MIL graph
matching one rule of :data:`~mobile_sd.export.coreml.ane.rules.RULES`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

from mobile_sd.export.coreml.ane.checks import compute_ops, finding, fmt_value, ints, outputs_of
from mobile_sd.export.coreml.ane.rules import (LUT_NBITS_NATIVE, MIN_LUT_GROUP, MIN_NORM_EPS, Finding,
                                           LintOptions)
from mobile_sd.export.coreml.inspect import MilGraph, describe_io, lut_info

if TYPE_CHECKING:
    from mobile_sd.export.coreml.ane.report import LintReport

# --- E12-E14, C4: compression -----------------------------------------------------------------

def _check_blockwise(graph: MilGraph, _: LintOptions, __: LintReport) -> Iterator[Finding]:
    for op in graph.ops:
        if op.type != "constexpr_blockwise_shift_scale":
            continue
        data, scale = graph.arg_info(op, "data"), graph.arg_info(op, "scale")
        offset = graph.arg_info(op, "offset")
        # Float data is a LUT being scaled (palettization with per-channel scale), not a weight.
        quantized = data is not None and data.dtype.startswith(("int", "uint"))
        if quantized and scale and data.shape and scale.shape and \
                len(data.shape) == len(scale.shape):
            blocks = [f"axis {i}: blocks of {d // s}" for i, (d, s) in
                      enumerate(zip(data.shape, scale.shape)) if i > 0 and s and s > 1 and d]
            if blocks:
                yield finding("E12", op, f"per-block {fmt_value(data)} scale {fmt_value(scale)} ("
                                          + ", ".join(blocks) + ")")
        if data and offset and data.dtype.startswith(("int", "uint")) and \
                offset.dtype.startswith(("float", "bfloat")):
            yield finding("C4", op, f"float offset {fmt_value(offset)} on int data {fmt_value(data)}")


def _check_lut(graph: MilGraph, _: LintOptions, __: LintReport) -> Iterator[Finding]:
    for op in graph.ops:
        if op.type != "constexpr_lut_to_dense":
            continue
        info = lut_info(graph, op)
        weight = fmt_value(graph.types[op.outputs[0].name])
        if info.nbits is not None and info.nbits not in LUT_NBITS_NATIVE:
            yield finding("E13", op, f"{info.nbits}-bit LUT (native: 1, 2, 4, 6, 8) on {weight}")
        if info.group_size is not None and info.group_size < MIN_LUT_GROUP:
            yield finding("E13", op, f"{info.num_luts} LUTs, one per {info.group_size} "
                                      f"channels (< {MIN_LUT_GROUP}) on {weight}")
        yield from _lut_scale_before_op(graph, op)


def _lut_scale_before_op(graph: MilGraph, lut_op: Any) -> Iterator[Finding]:
    """E14: lut -> constexpr_blockwise_shift_scale -> conv/linear/matmul (scale not moved)."""
    for scale_op in graph.consumers.get(lut_op.outputs[0].name, []):
        if scale_op.type != "constexpr_blockwise_shift_scale":
            continue
        users = [c for c in graph.consumers.get(scale_op.outputs[0].name, [])
                 if c.type in ("conv", "linear", "matmul")]
        if users:
            yield finding("E14", scale_op, f"LUT `{lut_op.outputs[0].name}` scaled before "
                                            f"{users[0].type} `{users[0].outputs[0].name}`")


# --- C1-C3, C5, C6 ----------------------------------------------------------------------------

_POOLS = {"avg_pool", "max_pool", "l2_pool"}
_UPSAMPLES = {"upsample_nearest_neighbor", "upsample_bilinear", "resize_nearest_neighbor",
              "resize_bilinear", "resize"}


def _check_c1(graph: MilGraph, _: LintOptions, __: LintReport) -> Iterator[Finding]:
    for op in compute_ops(graph):
        detail = None
        if op.type in ("conv", "conv_transpose"):
            dilations = ints(graph.const_value(op, "dilations"))
            detail = f"dilations {dilations}" if any(d > 1 for d in dilations) else None
        elif op.type in _POOLS:
            kernel = ints(graph.const_value(op, "kernel_sizes"))
            strides = ints(graph.const_value(op, "strides"))
            if max(kernel, default=0) > 13 or max(strides, default=0) > 2:
                detail = f"kernel {kernel}, strides {strides}"
        elif op.type in _UPSAMPLES:
            detail = _upsample_detail(graph, op)
        if detail:
            yield finding("C1", op, detail)


def _upsample_detail(graph: MilGraph, op: Any) -> str | None:
    x, out = graph.arg_info(op, "x"), graph.types[op.outputs[0].name]
    if not x or not x.shape or not out.shape or len(x.shape) != len(out.shape):
        return None
    ratios = [o / i for i, o in zip(x.shape[-2:], out.shape[-2:]) if i and o]
    if max(ratios, default=0) > 2:
        return f"upsample x{max(ratios):g}: {fmt_value(x)} -> {fmt_value(out)}"
    return None


def _check_c2(graph: MilGraph, _: LintOptions, __: LintReport) -> Iterator[Finding]:
    tensors = [(None, name, info) for name, info in graph.inputs.items()]
    tensors += [(op, name, info) for op in compute_ops(graph)
                for name, info in outputs_of(graph, op)]
    for op, name, info in tensors:
        if not info.shape:
            continue
        dims = [d or 0 for d in info.shape]
        spatial = dims[-2:] if len(dims) == 4 else dims[-1:]
        if max(spatial) > 16384 or max(dims) > 65536:
            detail = f"{name} {fmt_value(info)}: > 16384 on the last/spatial axis or > 65536"
            yield (finding("C2", op, detail) if op is not None
                   else Finding("C2", name, "input", detail, "FAIL"))


def _check_c3(graph: MilGraph, _: LintOptions, __: LintReport) -> Iterator[Finding]:
    for name, info in graph.inputs.items():
        if info.kind == "state" and info.shape and (info.shape[-1] or 0) % 32:
            yield Finding("C3", name, "state", f"state {fmt_value(info)}: last dim "
                          f"{info.shape[-1]} is not a multiple of 32", "FB/FAIL")
    for op in compute_ops(graph):
        # coreml_update_state is saved as write_state (+ read_state) in the package.
        if op.type in ("read_state", "write_state", "coreml_update_state"):
            state = graph.arg_info(op, "input") or graph.arg_info(op, "state")
            yield finding("C3", op, f"{op.type} of {fmt_value(state)}")


def _check_c5(graph: MilGraph, _: LintOptions, __: LintReport) -> Iterator[Finding]:
    enumerated = [e["name"] for e in describe_io(graph)["inputs"]
                  if "enumerated" in (e["flexible"] or {})]
    if enumerated:
        for op in compute_ops(graph):
            if op.type == "layer_norm":
                yield finding("C5", op, f"layer_norm with EnumeratedShapes inputs {enumerated}")


_INT_ARITHMETIC = {"add", "sub", "mul", "real_div", "floor_div", "mod", "pow", "maximum",
                   "minimum"}


def _check_c6(graph: MilGraph, _: LintOptions, __: LintReport) -> Iterator[Finding]:
    for op in compute_ops(graph):
        ints = [info for _, info in outputs_of(graph, op) if info.dtype.startswith(("int", "uint"))]
        if op.type in ("reduce_argmax", "reduce_argmin", "topk"):
            yield finding("C6", op, f"{op.type} -> {', '.join(fmt_value(i) for i in ints) or '?'}")
        elif op.type in _INT_ARITHMETIC and ints:
            yield finding("C6", op, f"integer {op.type} -> {fmt_value(ints[0])}")


# --- N1 ---------------------------------------------------------------------------------------

_NORMS = {"layer_norm", "batch_norm", "instance_norm", "l2_norm"}


def _check_n1(graph: MilGraph, _: LintOptions, __: LintReport) -> Iterator[Finding]:
    for op in compute_ops(graph):
        if op.type in _NORMS:
            eps = graph.const_value(op, "epsilon")
            stored = graph.arg_info(op, "epsilon")
            if eps is not None and eps.size == 1 and float(eps.reshape(-1)[0]) < MIN_NORM_EPS:
                yield finding("N1", op, f"epsilon {float(eps.reshape(-1)[0]):g} < "
                                         f"{MIN_NORM_EPS:g} (stored as {stored.dtype})")
        elif op.type in ("rsqrt", "sqrt", "inverse"):
            eps = _added_constant(graph, op)
            if eps is not None and eps < MIN_NORM_EPS:
                yield finding("N1", op, f"{op.type}(x + {eps:g}): eps < {MIN_NORM_EPS:g} "
                                         "(RMSNorm-style)")


def _added_constant(graph: MilGraph, op: Any) -> float | None:
    """c when ``op``'s input is ``add(x, c)`` with a const scalar c (an eps), else None."""
    source = graph.bindings(op, "x")
    producer = graph.producers.get(source[0]) if source and isinstance(source[0], str) else None
    if producer is None or producer.type != "add":
        return None
    for key in ("x", "y"):
        value = graph.const_value(producer, key)
        if value is not None and value.size == 1:
            return float(value.reshape(-1)[0])
    return None


CHECKS = (_check_blockwise, _check_lut, _check_c1, _check_c2, _check_c3, _check_c5, _check_c6,
          _check_n1)
