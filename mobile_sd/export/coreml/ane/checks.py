"""ANE lint checks E1-E10 (precision, shapes, ops, weights, layout, attention).

Each check yields :class:`~mobile_sd.export.coreml.ane.rules.Finding` for the ops of a MIL graph
matching one rule of :data:`~mobile_sd.export.coreml.ane.rules.RULES`.
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Iterator

from mobile_sd.export.coreml.ane.rules import (LARGE_ACTIVATION, MAC_WEIGHT_FILE_LIMIT,
                                           MAX_ENUMERATED_SHAPES, MAX_QUERY_LENGTH,
                                           RULES_BY_ID, SMALL_LAST_DIM, Finding, LintOptions)
from mobile_sd.export.coreml.inspect import MilGraph, ValueInfo, describe_io, is_const_op

if TYPE_CHECKING:
    from mobile_sd.export.coreml.ane.report import LintReport

# --- helpers ----------------------------------------------------------------------------------

def finding(rule: str, op: Any, detail: str, severity: str | None = None) -> Finding:
    name = op.outputs[0].name if len(op.outputs) else op.type
    return Finding(rule, name, op.type, detail, severity or RULES_BY_ID[rule].severity)


def fmt_value(info: ValueInfo | None) -> str:
    if info is None:
        return "?"
    if info.shape is None:
        return info.dtype
    return f"{info.dtype}[{', '.join('?' if d is None else str(d) for d in info.shape)}]"


def compute_ops(graph: MilGraph) -> Iterator[Any]:
    return (op for op in graph.ops if not is_const_op(op))


def outputs_of(graph: MilGraph, op: Any) -> list[tuple[str, ValueInfo]]:
    return [(out.name, graph.types[out.name]) for out in op.outputs]


def ints(value: Any) -> list[int]:
    return [] if value is None else [int(v) for v in value.reshape(-1)]


# --- E1-E7 ------------------------------------------------------------------------------------

def _check_e1(graph: MilGraph, options: LintOptions, _: LintReport) -> Iterator[Finding]:
    if not options.expect_fp16:
        return
    for op in compute_ops(graph):
        if op.type == "cast":
            out = op.outputs[0].name
            # Casts at the model's edges are how fp32 I/O enters and leaves an fp16 model.
            if graph.types[out].dtype == "float32" and out not in graph.outputs:
                source = graph.arg_info(op, "x")
                yield finding("E1", op, f"cast to fp32 mid-graph: {fmt_value(source)} -> "
                                         f"{fmt_value(graph.types[out])}")
            continue
        # Const arguments are parameters (e.g. upsample's fp32 scale factors), not activations.
        fp32 = [f"{key}: {fmt_value(info)}" for key, binding, info in graph.tensor_args(op)
                if info.dtype == "float32" and not graph.is_const(binding)]
        fp32 += [f"out {name}: {fmt_value(info)}" for name, info in outputs_of(graph, op)
                 if info.dtype == "float32"]
        if fp32:
            yield finding("E1", op, "fp32 tensors: " + "; ".join(fp32))


def _check_e2(graph: MilGraph, _: LintOptions, __: LintReport) -> Iterator[Finding]:
    for name, info in graph.inputs.items():
        if (info.rank or 0) >= 5:
            yield _rank_finding(name, "input", info)
    for op in compute_ops(graph):
        ranked = [(info.rank, name, info) for name, info in outputs_of(graph, op)
                  if info.rank is not None]
        if ranked and max(r[0] for r in ranked) >= 5:
            _, name, info = max(ranked, key=lambda r: r[0])
            yield _rank_finding(op.outputs[0].name, op.type, info, name)


def _rank_finding(op_name: str, op_type: str, info: ValueInfo, tensor: str = "") -> Finding:
    where = f"{tensor}: " if tensor else ""
    if info.rank > 5:
        return Finding("E2", op_name, op_type, f"{where}rank {info.rank} > 5 {fmt_value(info)}: "
                       "Core ML will not load it", "FAIL")
    return Finding("E2", op_name, op_type, f"{where}rank 5 {fmt_value(info)}: loads, but keep <= 4 "
                   "for the NE", "note")


def _check_e3(graph: MilGraph, _: LintOptions, __: LintReport) -> Iterator[Finding]:
    described = set()
    for entry in describe_io(graph)["inputs"]:
        flexible = entry["flexible"] or {}
        described.add(entry["name"])
        if "range" in flexible:
            yield Finding("E3", entry["name"], "input", f"RangeDim input: ranges "
                          f"{flexible['range']}, default shape {entry['shape']}", "FB")
        elif len(flexible.get("enumerated", [])) > MAX_ENUMERATED_SHAPES:
            yield Finding("E3", entry["name"], "input", f"{len(flexible['enumerated'])} "
                          f"enumerated shapes > {MAX_ENUMERATED_SHAPES}", "FB")
    for name, info in graph.inputs.items():
        if name not in described and info.shape is not None and None in info.shape:
            yield Finding("E3", name, "input", f"flexible MIL input {fmt_value(info)}", "FB")


# Arguments that carry a shape (or sizes/positions) the NE needs at compile time.
_SHAPE_ARGS = {"reshape": ("shape",), "fill": ("shape",), "tile": ("reps",),
               "slice_by_index": ("begin", "end"), "slice_by_size": ("begin", "size"),
               "pad": ("pad",), "resize": ("shape",)}


def _check_e4(graph: MilGraph, _: LintOptions, __: LintReport) -> Iterator[Finding]:
    for op in compute_ops(graph):
        for key in _SHAPE_ARGS.get(op.type, ()):
            dynamic = [b for b in graph.bindings(op, key) if not graph.is_const(b)]
            if dynamic:
                fed_by = graph.producer_type(dynamic[0]) or "an input"
                yield finding("E4", op, f"{key} is not const (computed by {fed_by} "
                                         f"`{dynamic[0]}`)")


_OP_RULES = {"E5": {"lstm", "gru", "rnn"},
             "E6": {"scatter", "scatter_nd", "scatter_along_axis"},
             "E11": {"quantize", "dequantize"}}


def _check_op_types(graph: MilGraph, _: LintOptions, __: LintReport) -> Iterator[Finding]:
    for op in compute_ops(graph):
        for rule, types in _OP_RULES.items():
            if op.type in types:
                outs = ", ".join(fmt_value(info) for _, info in outputs_of(graph, op))
                yield finding(rule, op, f"{op.type} -> {outs}")


def _check_weights(graph: MilGraph, options: LintOptions, report: LintReport) -> Iterator[Finding]:
    stored = max(report.weight_bytes, report.weight_file_bytes)
    if stored > options.weight_limit:
        yield Finding("E7", graph.label, "weights", f"{stored / 1e9:.2f} GB of weights > "
                      f"{options.weight_limit / 1e9:.2f} GB (ops: {report.weight_bytes:,} B, "
                      f"weight files: {report.weight_file_bytes:,} B)", "FAIL")
    if report.weight_file_bytes > MAC_WEIGHT_FILE_LIMIT:
        yield Finding("C7", graph.label, "weights", f"weight files "
                      f"{report.weight_file_bytes / 2**30:.2f} GiB > 2 GiB", "FAIL")


# --- E8-E10: layout and attention -------------------------------------------------------------

_FLOATS = {"float16": 2, "float32": 4}


def _check_e8(graph: MilGraph, _: LintOptions, __: LintReport) -> Iterator[Finding]:
    for op in compute_ops(graph):
        heavy = _rank3_heavy(graph, op)
        if heavy:
            yield finding("E8", op, heavy)
            continue
        for name, info in outputs_of(graph, op):
            last = info.shape[-1] if info.rank and info.rank >= 2 else None
            itemsize = _FLOATS.get(info.dtype)
            if (itemsize and last and last <= SMALL_LAST_DIM
                    and (info.numel or 0) >= LARGE_ACTIVATION):
                padded = -(-last * itemsize // 64) * 64
                yield finding("E8", op, f"{name} {fmt_value(info)}: last dim {last} padded to 64 B "
                                         f"({padded / (last * itemsize):.0f}x the memory)")
                break


def _rank3_heavy(graph: MilGraph, op: Any) -> str | None:
    """linear (or matmul by a const weight) on a rank-3 (B,S,C) activation."""
    if op.type not in ("linear", "matmul"):
        return None
    x = graph.arg_info(op, "x")
    weight = graph.bindings(op, "weight" if op.type == "linear" else "y")
    if x is None or x.rank != 3 or not weight:
        return None
    if op.type == "matmul" and not graph.is_const(weight[0]):
        return None
    return f"{op.type} on rank-3 {fmt_value(x)} (B,S,C): a 1x1 conv on (B,C,1,S) suits the NE"


# Ops allowed between the QK^T matmul and its softmax (scale, bias, casts).
_SCORE_PASSTHROUGH = {"mul", "add", "sub", "real_div", "cast"}
_LAYOUT_OPS = {"transpose", "reshape"}


def _check_e9(graph: MilGraph, _: LintOptions, __: LintReport) -> Iterator[Finding]:
    for op in compute_ops(graph):
        issues: list[str] = []
        if op.type == "scaled_dot_product_attention":
            issues = _sdpa_issues(graph, op)
        elif op.type in ("matmul", "einsum"):
            operands = _operands(graph, op)
            softmax = _softmax_after(graph, op)
            if len(operands) == 2 and softmax is not None and not any(
                    graph.is_const(b) for b in operands):
                issues = _score_issues(graph, op, softmax, operands)
        if issues:
            yield finding("E9", op, "; ".join(issues))


def _operands(graph: MilGraph, op: Any) -> list:
    if op.type == "einsum":
        return graph.bindings(op, "values")
    return graph.bindings(op, "x") + graph.bindings(op, "y")


def _softmax_after(graph: MilGraph, op: Any, hops: int = 3) -> Any | None:
    """The softmax this matmul feeds (through scale / bias ops), i.e. op computes QK^T."""
    queue = deque([(op.outputs[0].name, 0)])
    while queue:
        name, depth = queue.popleft()
        for consumer in graph.consumers.get(name, []):
            if consumer.type == "softmax":
                return consumer
            if consumer.type in _SCORE_PASSTHROUGH and depth < hops:
                queue.append((consumer.outputs[0].name, depth + 1))
    return None


def _score_issues(graph: MilGraph, op: Any, softmax: Any, operands: list) -> list[str]:
    scores = graph.types[op.outputs[0].name]
    if not scores.shape or len(scores.shape) < 2:
        return []
    rank = len(scores.shape)
    axis = ints(graph.const_value(softmax, "axis"))
    axis = axis[0] % rank if axis else rank - 1
    issues = []
    if axis == rank - 1:        # [..., Sq, Sk]: plain matmul attention
        query = scores.shape[-2]
        if rank >= 4 and (scores.shape[-3] or 0) > 1:
            issues.append(f"{scores.shape[-3]} heads in one {op.type} {fmt_value(scores)} "
                          "(not split per head)")
    else:                       # e.g. split_einsum's (B, Sk, 1, Sq), softmax on axis 1
        others = [d or 0 for i, d in enumerate(scores.shape) if i not in (0, axis)]
        query = max(others, default=0)
    if query and query > MAX_QUERY_LENGTH:
        issues.append(f"query length {query} > {MAX_QUERY_LENGTH} unchunked "
                      f"({fmt_value(scores)} scores)")
    around = _layout_ops_around(graph, operands, softmax)
    if around:
        issues.append("transpose/reshape around QK^T: " + ", ".join(around))
    return issues


def _layout_ops_around(graph: MilGraph, operands: list, softmax: Any) -> list[str]:
    """transpose/reshape feeding QK^T, or consuming the attention output (softmax @ V)."""
    around = [f"{graph.producer_type(b)} `{b}` before" for b in operands
              if graph.producer_type(b) in _LAYOUT_OPS]
    for av in graph.consumers.get(softmax.outputs[0].name, []):
        if av.type in ("matmul", "einsum"):
            around += [f"{c.type} `{c.outputs[0].name}` after"
                       for c in graph.consumers.get(av.outputs[0].name, [])
                       if c.type in _LAYOUT_OPS]
    return around


def _sdpa_issues(graph: MilGraph, op: Any) -> list[str]:
    query = graph.arg_info(op, "query")
    issues = []
    if query and query.shape and len(query.shape) >= 2 and (query.shape[-2] or 0) > \
            MAX_QUERY_LENGTH:
        issues.append(f"query length {query.shape[-2]} > {MAX_QUERY_LENGTH} unchunked "
                      f"(query {fmt_value(query)})")
    around = [f"{graph.producer_type(b)} `{b}` before"
              for key in ("query", "key", "value") for b in graph.bindings(op, key)
              if graph.producer_type(b) in _LAYOUT_OPS]
    if around:
        issues.append("transpose/reshape around the attention: " + ", ".join(around))
    return issues


def _check_e10(graph: MilGraph, _: LintOptions, __: LintReport) -> Iterator[Finding]:
    for op in compute_ops(graph):
        if op.type not in ("gather", "gather_along_axis", "gather_nd"):
            continue
        indices = graph.bindings(op, "indices")
        info = graph.arg_info(op, "indices")
        # Const indices are a static slice; run-time int ids are the embedding-lookup case.
        if indices and info and info.dtype.startswith(("int", "uint")) and \
                not graph.is_const(indices[0]):
            table = graph.bindings(op, "x")
            what = "embedding lookup" if table and graph.is_const(table[0]) else "gather"
            yield finding("E10", op, f"{what} on {fmt_value(info)} ids from "
                                      f"{fmt_value(graph.arg_info(op, 'x'))}")


CHECKS = (_check_e1, _check_e2, _check_e3, _check_e4, _check_op_types, _check_weights, _check_e8,
          _check_e9, _check_e10)
