"""ANE lint: static checks of a Core ML ML Program for what keeps work off the Neural Engine.

Implements the rules of ``ane.md`` section 1 that a saved package (or an in-memory ``MLModel``
from ``ct.convert``) can decide without a Mac. Every finding is a **warning**: Core ML places ops
on device with a cost model that varies with chip and OS, and Apple publishes no op list, so a
finding says "look here", never "this op runs on the GPU". Confirm with ``MLComputePlan`` or
Xcode's performance report (ane.md section 2).

>>> report = lint_package("out/unet.mlpackage")            # doctest: +SKIP
>>> report.counts()["E9"], report.findings[0].rule          # doctest: +SKIP
(16, 'E1')
>>> Path("unet.lint.md").write_text(report.to_markdown())   # doctest: +SKIP

The rule table (:data:`RULES`) is data: id, severity, basis, the public source exactly as in
ane.md, what it means and what to do. The checks read the MIL protobuf through
:class:`~mobile_sd.exporters.coreml_inspect.MilGraph`.
"""
from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

from mobile_sd.exporters.coreml_inspect import (MilGraph, ValueInfo, describe_io, is_const_op,
                                                load_graph, lut_info, weight_bytes,
                                                weight_file_bytes)

WEIGHT_LIMIT_BYTES = 10**9              # E7: ~1 GB of weights per model on iPhone
MAC_WEIGHT_FILE_LIMIT = 2 * 2**30       # C7: weight file > 2 GiB fails to load on Mac
MAX_QUERY_LENGTH = 512                  # E9: query chunk size of split_einsum_v2
SMALL_LAST_DIM = 8                      # E8: <= 8 fp16 values pads to 32 (>= 4x the memory)
LARGE_ACTIVATION = 16384                # E8: ... on activations of at least this many values
LUT_NBITS_NATIVE = frozenset({1, 2, 4, 6, 8})
MIN_LUT_GROUP = 8
MIN_NORM_EPS = 1e-7
MAX_ENUMERATED_SHAPES = 128

HEADER_NOTE = ("All findings are warnings: Core ML decides op placement on device (cost model "
               "per chip and OS; no public op list). Confirm with MLComputePlan or Xcode's "
               "performance report (ane.md section 2).")


@dataclass(frozen=True)
class Rule:
    """One row of ane.md's rule table, plus what it means and what to do about it."""

    id: str
    severity: str           # FB (likely fallback), SLOW, FAIL, accuracy
    basis: str              # E: Apple docs/repos/maintainers; C: community observation
    source: str             # exactly as in ane.md
    explanation: str
    action: str


RULES: tuple[Rule, ...] = (
    Rule("E1", "FB", "E", "[T]; [SD] torch2coreml.py",
         "The NE computes in fp16 only: an op with an fp32 input/output runs on GPU/CPU, and "
         "each switch copies tensors.",
         "Convert with compute_precision=FLOAT16; cast only at the model's inputs/outputs."),
    Rule("E2", "FAIL", "E", "coremltools #1723, #2291",
         "Core ML loads tensors up to rank 5; rank > 5 does not load. Rank 5 is a note (the NE "
         "works in rank <= 4 layouts); coremltools' own group_norm emits rank-5 tensors.",
         "Merge dims (reshape to rank <= 4) around the op, e.g. split windows/heads in a loop."),
    Rule("E3", "FB", "E", "[FR]; [F]",
         "A RangeDim input: the NE plan is for the default shape; other shapes fall back unless "
         "loaded with reshapeFrequency=Infrequent (iOS 17.4+).",
         "Use static shapes or EnumeratedShapes (<= 128), e.g. one package per resolution."),
    Rule("E4", "FB", "E", "[F] faqs.md",
         "A shape-taking op whose shape is computed at run time (e.g. fed by `shape`) is "
         "dynamic; the NE needs static shapes.",
         "Export with static shapes so the shape folds to a const; avoid x.shape arithmetic."),
    Rule("E5", "FB", "E", "coremltools #1780, #337",
         "Recurrent ops (lstm, gru, rnn) do not run on the NE.",
         "Replace them by conv/attention blocks, or keep them in a separate CPU model."),
    Rule("E6", "FB", "E", "[CT] ops.py",
         "Scatter ops (from index_put / in-place slice assignment) fall back.",
         "Rewrite as concat / select with masks in torch before export."),
    Rule("E7", "FAIL", "E", "[U] bisect_model; [SD]",
         "An iPhone does not load more than ~1 GB of weights per model on the NE.",
         "Palettize to <= 6 bits, or split with ct.models.utils.bisect_model."),
    Rule("E8", "SLOW", "E", "[A] principle 1; [AT]",
         "The NE pads the last axis to 64 bytes (32 fp16 values): a small last dim wastes "
         "memory and bandwidth; linear/matmul on (B,S,C) misses the NE's conv layout.",
         "Use the (B,C,1,S) layout with 1x1 conv (linear_to_conv); keep the long axis last."),
    Rule("E9", "SLOW", "E", "[A] 2-3; [SD] attention.py",
         "NE attention is fastest split per head, without transposes/reshapes around QK^T, and "
         "with query chunks <= 512 (long queries materialize Sq x Sk maps).",
         "Use split_einsum_v2 attention (per-head einsum, query chunks of 512)."),
    Rule("E10", "FB", "E", "[AT] README",
         "A gather on int32 ids (embedding lookup) runs on CPU; cheap, but it splits the graph.",
         "Usually fine for the token embedding; keep lookups at the start of the graph."),
    Rule("E11", "SLOW", "E", "[Q]",
         "Activation quantize/dequantize (W8A8) pays off only on A17 Pro/M4 and later, and "
         "only for ops the NE runs.",
         "Use weight-only compression for older targets."),
    Rule("E12", "SLOW", "E", "[Q]",
         "Per-block weights (constexpr_blockwise_shift_scale with blocks along the input dim) "
         "decompress slowly on the NE; per-block targets the GPU.",
         "Use per-channel quantization or palettization for NE targets."),
    Rule("E13", "SLOW", "E", "[SD] README; [Q]",
         "LUT widths other than 1, 2, 4, 6, 8 bits, or many small LUTs (grouped channels, "
         "group < 8), decompress slowly.",
         "Palettize with nbits in {1, 2, 4, 6, 8} and group_size >= 8 (or per-tensor)."),
    Rule("E14", "FB/SLOW", "E", "[CT] reorder_lut_per_channel_scale",
         "A per-channel scale applied to a LUT weight before conv/linear/matmul; the NE wants "
         "the scale moved after the op.",
         "Keep coremltools' reorder_lut_per_channel_scale pass on, or drop the per-channel "
         "scale."),
    Rule("C1", "FB", "C", "[H]; hollance/neural-engine #1",
         "Reported NE misses: dilated conv, pool kernel > 13 or stride > 2, upsample > 2x.",
         "Use undilated convs, stacked small pools, repeated 2x upsampling."),
    Rule("C2", "FAIL", "C", "ncdrone/rustane #13; maderix/ANE #26; coremltools #2247",
         "Reported failures with a dim > 16384 on the last/spatial axis or > 65536 on any axis.",
         "Tile large images; reshape so that no axis exceeds the limits."),
    Rule("C3", "FB/FAIL", "C", "coremltools #2553, #2631, #2600",
         "Stateful models (read_state / coreml_update_state) are reported off the NE, and to "
         "fail there when a state dim is not a multiple of 32.",
         "Pad state dims to multiples of 32, or pass the state as inputs/outputs."),
    Rule("C4", "FB", "C", "[FO] 759608",
         "constexpr_blockwise_shift_scale with a float offset on int data is reported to fall "
         "back.",
         "Use symmetric quantization (no offset) or an integer offset."),
    Rule("C5", "FB", "C", "coremltools #1909",
         "EnumeratedShapes inputs together with layer_norm were reported off the NE.",
         "Use one static-shape package per shape, or replace layer_norm by explicit ops."),
    Rule("C6", "FB", "C", "[H] 16-bit.md",
         "The NE has no int32 arithmetic: int ops, argmax and topk on the compute path run on "
         "CPU.",
         "Keep integer logic on the host, or express it in fp16."),
    Rule("C7", "FAIL", "C", "coremltools #2593, #1807",
         "A weights file over 2 GiB is reported to fail to load on Mac.",
         "Compress or split the model."),
    Rule("N1", "accuracy", "E/C", "[AT] distilbert.py; [CT] rms_norm",
         "A norm eps below 1e-7 is not representable in fp16 (smallest subnormal ~6e-8; 1e-9 "
         "is stored as 6e-8): constant rows divide by ~zero.",
         "Use eps >= 1e-7 (1e-5 is typical); for RMSNorm add eps as a visible const."),
)
RULES_BY_ID = {rule.id: rule for rule in RULES}
# What is not decided statically (reported in to_markdown / to_dict).
NOT_CHECKED = {
    "N1": "squares of values > ~256 (fp16 overflow) need value ranges, only eps is checked",
    "E11": "the target chip is unknown, so every activation quantize/dequantize is reported",
    "E3": "reshapeFrequency is a load-time option, so every RangeDim input is reported",
}


@dataclass(frozen=True)
class Finding:
    """One op (or input / the whole model) matching a rule."""

    rule: str
    op_name: str            # the op's first output name (what MLComputePlan reports), or input
    op_type: str
    detail: str
    severity: str           # the rule's, or "note" for weaker matches (rank-5 tensors)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LintReport:
    """Findings of :func:`lint_package`, with per-rule counts and JSON / Markdown renderings."""

    model: str
    findings: list[Finding] = field(default_factory=list)
    weight_bytes: int = 0
    weight_file_bytes: int = 0
    expect_fp16: bool = True

    def counts(self) -> dict[str, int]:
        """Findings per rule id, every rule listed (0 when clean)."""
        counts = {rule.id: 0 for rule in RULES}
        for finding in self.findings:
            counts[finding.rule] += 1
        return counts

    def by_rule(self, rule_id: str) -> list[Finding]:
        return [f for f in self.findings if f.rule == rule_id]

    def to_dict(self) -> dict:
        """JSON-able: the model, the note, counts, findings and the rule table."""
        return {"model": self.model, "note": HEADER_NOTE, "expect_fp16": self.expect_fp16,
                "weight_bytes": self.weight_bytes, "weight_file_bytes": self.weight_file_bytes,
                "counts": self.counts(), "findings": [f.to_dict() for f in self.findings],
                "rules": [asdict(rule) for rule in RULES], "not_checked": dict(NOT_CHECKED)}

    def to_markdown(self, max_per_rule: int = 10) -> str:
        """A rule table (with sources) and the findings, at most ``max_per_rule`` per rule."""
        counts = self.counts()
        lines = [f"# ANE lint: {self.model}", "", f"**{HEADER_NOTE}**", "",
                 "| rule | warnings | severity | basis | source | meaning | what to do |",
                 "|---|---|---|---|---|---|---|"]
        lines += [f"| {r.id} | {counts[r.id]} | {r.severity} | {r.basis} | {r.source} | "
                  f"{r.explanation} | {r.action} |" for r in RULES]
        lines += ["", f"Weights: {self.weight_bytes:,} bytes in ops, {self.weight_file_bytes:,} "
                  "bytes in weight files.", "", "Not decided statically: "
                  + "; ".join(f"{k}: {v}" for k, v in NOT_CHECKED.items()) + "."]
        for rule in (r for r in RULES if counts[r.id]):
            found = self.by_rule(rule.id)
            lines += ["", f"## {rule.id} ({len(found)})", "", "| op | type | severity | detail |",
                      "|---|---|---|---|"]
            lines += [f"| `{f.op_name}` | {f.op_type} | {f.severity} | "
                      f"{f.detail.replace('|', '&#124;')} |" for f in found[:max_per_rule]]
            if len(found) > max_per_rule:
                lines.append(f"| ... | | | {len(found) - max_per_rule} more |")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class _Options:
    expect_fp16: bool
    weight_limit: int


def lint_package(model: Any, *, expect_fp16: bool = True,
                 weight_limit_bytes: int = WEIGHT_LIMIT_BYTES) -> LintReport:
    """Lint a ``.mlpackage`` path, an in-memory ``MLModel`` (before saving) or a spec.

    ``expect_fp16=False`` skips E1 for models that are fp32 on purpose.
    """
    graph = load_graph(model)
    options = _Options(expect_fp16, weight_limit_bytes)
    report = LintReport(model=graph.label, weight_bytes=weight_bytes(graph),
                        weight_file_bytes=weight_file_bytes(graph), expect_fp16=expect_fp16)
    for check in _CHECKS:
        report.findings.extend(check(graph, options, report))
    return report


# --- helpers ----------------------------------------------------------------------------------

def _finding(rule: str, op: Any, detail: str, severity: str | None = None) -> Finding:
    name = op.outputs[0].name if len(op.outputs) else op.type
    return Finding(rule, name, op.type, detail, severity or RULES_BY_ID[rule].severity)


def _fmt(info: ValueInfo | None) -> str:
    if info is None:
        return "?"
    if info.shape is None:
        return info.dtype
    return f"{info.dtype}[{', '.join('?' if d is None else str(d) for d in info.shape)}]"


def _compute_ops(graph: MilGraph) -> Iterator[Any]:
    return (op for op in graph.ops if not is_const_op(op))


def _outputs(graph: MilGraph, op: Any) -> list[tuple[str, ValueInfo]]:
    return [(out.name, graph.types[out.name]) for out in op.outputs]


def _ints(value: Any) -> list[int]:
    return [] if value is None else [int(v) for v in value.reshape(-1)]


Check = Callable[[MilGraph, _Options, LintReport], Iterator[Finding]]


# --- E1-E7 ------------------------------------------------------------------------------------

def _check_e1(graph: MilGraph, options: _Options, _: LintReport) -> Iterator[Finding]:
    if not options.expect_fp16:
        return
    for op in _compute_ops(graph):
        if op.type == "cast":
            out = op.outputs[0].name
            # Casts at the model's edges are how fp32 I/O enters and leaves an fp16 model.
            if graph.types[out].dtype == "float32" and out not in graph.outputs:
                source = graph.arg_info(op, "x")
                yield _finding("E1", op, f"cast to fp32 mid-graph: {_fmt(source)} -> "
                                         f"{_fmt(graph.types[out])}")
            continue
        # Const arguments are parameters (e.g. upsample's fp32 scale factors), not activations.
        fp32 = [f"{key}: {_fmt(info)}" for key, binding, info in graph.tensor_args(op)
                if info.dtype == "float32" and not graph.is_const(binding)]
        fp32 += [f"out {name}: {_fmt(info)}" for name, info in _outputs(graph, op)
                 if info.dtype == "float32"]
        if fp32:
            yield _finding("E1", op, "fp32 tensors: " + "; ".join(fp32))


def _check_e2(graph: MilGraph, _: _Options, __: LintReport) -> Iterator[Finding]:
    for name, info in graph.inputs.items():
        if (info.rank or 0) >= 5:
            yield _rank_finding(name, "input", info)
    for op in _compute_ops(graph):
        ranked = [(info.rank, name, info) for name, info in _outputs(graph, op)
                  if info.rank is not None]
        if ranked and max(r[0] for r in ranked) >= 5:
            _, name, info = max(ranked, key=lambda r: r[0])
            yield _rank_finding(op.outputs[0].name, op.type, info, name)


def _rank_finding(op_name: str, op_type: str, info: ValueInfo, tensor: str = "") -> Finding:
    where = f"{tensor}: " if tensor else ""
    if info.rank > 5:
        return Finding("E2", op_name, op_type, f"{where}rank {info.rank} > 5 {_fmt(info)}: "
                       "Core ML will not load it", "FAIL")
    return Finding("E2", op_name, op_type, f"{where}rank 5 {_fmt(info)}: loads, but keep <= 4 "
                   "for the NE", "note")


def _check_e3(graph: MilGraph, _: _Options, __: LintReport) -> Iterator[Finding]:
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
            yield Finding("E3", name, "input", f"flexible MIL input {_fmt(info)}", "FB")


# Arguments that carry a shape (or sizes/positions) the NE needs at compile time.
_SHAPE_ARGS = {"reshape": ("shape",), "fill": ("shape",), "tile": ("reps",),
               "slice_by_index": ("begin", "end"), "slice_by_size": ("begin", "size"),
               "pad": ("pad",), "resize": ("shape",)}


def _check_e4(graph: MilGraph, _: _Options, __: LintReport) -> Iterator[Finding]:
    for op in _compute_ops(graph):
        for key in _SHAPE_ARGS.get(op.type, ()):
            dynamic = [b for b in graph.bindings(op, key) if not graph.is_const(b)]
            if dynamic:
                fed_by = graph.producer_type(dynamic[0]) or "an input"
                yield _finding("E4", op, f"{key} is not const (computed by {fed_by} "
                                         f"`{dynamic[0]}`)")


_OP_RULES = {"E5": {"lstm", "gru", "rnn"},
             "E6": {"scatter", "scatter_nd", "scatter_along_axis"},
             "E11": {"quantize", "dequantize"}}


def _check_op_types(graph: MilGraph, _: _Options, __: LintReport) -> Iterator[Finding]:
    for op in _compute_ops(graph):
        for rule, types in _OP_RULES.items():
            if op.type in types:
                outs = ", ".join(_fmt(info) for _, info in _outputs(graph, op))
                yield _finding(rule, op, f"{op.type} -> {outs}")


def _check_weights(graph: MilGraph, options: _Options, report: LintReport) -> Iterator[Finding]:
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


def _check_e8(graph: MilGraph, _: _Options, __: LintReport) -> Iterator[Finding]:
    for op in _compute_ops(graph):
        heavy = _rank3_heavy(graph, op)
        if heavy:
            yield _finding("E8", op, heavy)
            continue
        for name, info in _outputs(graph, op):
            last = info.shape[-1] if info.rank and info.rank >= 2 else None
            itemsize = _FLOATS.get(info.dtype)
            if (itemsize and last and last <= SMALL_LAST_DIM
                    and (info.numel or 0) >= LARGE_ACTIVATION):
                padded = -(-last * itemsize // 64) * 64
                yield _finding("E8", op, f"{name} {_fmt(info)}: last dim {last} padded to 64 B "
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
    return f"{op.type} on rank-3 {_fmt(x)} (B,S,C): a 1x1 conv on (B,C,1,S) suits the NE"


# Ops allowed between the QK^T matmul and its softmax (scale, bias, casts).
_SCORE_PASSTHROUGH = {"mul", "add", "sub", "real_div", "cast"}
_LAYOUT_OPS = {"transpose", "reshape"}


def _check_e9(graph: MilGraph, _: _Options, __: LintReport) -> Iterator[Finding]:
    for op in _compute_ops(graph):
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
            yield _finding("E9", op, "; ".join(issues))


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
    axis = _ints(graph.const_value(softmax, "axis"))
    axis = axis[0] % rank if axis else rank - 1
    issues = []
    if axis == rank - 1:        # [..., Sq, Sk]: plain matmul attention
        query = scores.shape[-2]
        if rank >= 4 and (scores.shape[-3] or 0) > 1:
            issues.append(f"{scores.shape[-3]} heads in one {op.type} {_fmt(scores)} "
                          "(not split per head)")
    else:                       # e.g. split_einsum's (B, Sk, 1, Sq), softmax on axis 1
        others = [d or 0 for i, d in enumerate(scores.shape) if i not in (0, axis)]
        query = max(others, default=0)
    if query and query > MAX_QUERY_LENGTH:
        issues.append(f"query length {query} > {MAX_QUERY_LENGTH} unchunked "
                      f"({_fmt(scores)} scores)")
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
                      f"(query {_fmt(query)})")
    around = [f"{graph.producer_type(b)} `{b}` before"
              for key in ("query", "key", "value") for b in graph.bindings(op, key)
              if graph.producer_type(b) in _LAYOUT_OPS]
    if around:
        issues.append("transpose/reshape around the attention: " + ", ".join(around))
    return issues


def _check_e10(graph: MilGraph, _: _Options, __: LintReport) -> Iterator[Finding]:
    for op in _compute_ops(graph):
        if op.type not in ("gather", "gather_along_axis", "gather_nd"):
            continue
        indices = graph.bindings(op, "indices")
        info = graph.arg_info(op, "indices")
        # Const indices are a static slice; run-time int ids are the embedding-lookup case.
        if indices and info and info.dtype.startswith(("int", "uint")) and \
                not graph.is_const(indices[0]):
            table = graph.bindings(op, "x")
            what = "embedding lookup" if table and graph.is_const(table[0]) else "gather"
            yield _finding("E10", op, f"{what} on {_fmt(info)} ids from "
                                      f"{_fmt(graph.arg_info(op, 'x'))}")


# --- E12-E14, C4: compression -----------------------------------------------------------------

def _check_blockwise(graph: MilGraph, _: _Options, __: LintReport) -> Iterator[Finding]:
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
                yield _finding("E12", op, f"per-block {_fmt(data)} scale {_fmt(scale)} ("
                                          + ", ".join(blocks) + ")")
        if data and offset and data.dtype.startswith(("int", "uint")) and \
                offset.dtype.startswith(("float", "bfloat")):
            yield _finding("C4", op, f"float offset {_fmt(offset)} on int data {_fmt(data)}")


def _check_lut(graph: MilGraph, _: _Options, __: LintReport) -> Iterator[Finding]:
    for op in graph.ops:
        if op.type != "constexpr_lut_to_dense":
            continue
        info = lut_info(graph, op)
        weight = _fmt(graph.types[op.outputs[0].name])
        if info.nbits is not None and info.nbits not in LUT_NBITS_NATIVE:
            yield _finding("E13", op, f"{info.nbits}-bit LUT (native: 1, 2, 4, 6, 8) on {weight}")
        if info.group_size is not None and info.group_size < MIN_LUT_GROUP:
            yield _finding("E13", op, f"{info.num_luts} LUTs, one per {info.group_size} "
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
            yield _finding("E14", scale_op, f"LUT `{lut_op.outputs[0].name}` scaled before "
                                            f"{users[0].type} `{users[0].outputs[0].name}`")


# --- C1-C3, C5, C6 ----------------------------------------------------------------------------

_POOLS = {"avg_pool", "max_pool", "l2_pool"}
_UPSAMPLES = {"upsample_nearest_neighbor", "upsample_bilinear", "resize_nearest_neighbor",
              "resize_bilinear", "resize"}


def _check_c1(graph: MilGraph, _: _Options, __: LintReport) -> Iterator[Finding]:
    for op in _compute_ops(graph):
        detail = None
        if op.type in ("conv", "conv_transpose"):
            dilations = _ints(graph.const_value(op, "dilations"))
            detail = f"dilations {dilations}" if any(d > 1 for d in dilations) else None
        elif op.type in _POOLS:
            kernel = _ints(graph.const_value(op, "kernel_sizes"))
            strides = _ints(graph.const_value(op, "strides"))
            if max(kernel, default=0) > 13 or max(strides, default=0) > 2:
                detail = f"kernel {kernel}, strides {strides}"
        elif op.type in _UPSAMPLES:
            detail = _upsample_detail(graph, op)
        if detail:
            yield _finding("C1", op, detail)


def _upsample_detail(graph: MilGraph, op: Any) -> str | None:
    x, out = graph.arg_info(op, "x"), graph.types[op.outputs[0].name]
    if not x or not x.shape or not out.shape or len(x.shape) != len(out.shape):
        return None
    ratios = [o / i for i, o in zip(x.shape[-2:], out.shape[-2:]) if i and o]
    if max(ratios, default=0) > 2:
        return f"upsample x{max(ratios):g}: {_fmt(x)} -> {_fmt(out)}"
    return None


def _check_c2(graph: MilGraph, _: _Options, __: LintReport) -> Iterator[Finding]:
    tensors = [(None, name, info) for name, info in graph.inputs.items()]
    tensors += [(op, name, info) for op in _compute_ops(graph)
                for name, info in _outputs(graph, op)]
    for op, name, info in tensors:
        if not info.shape:
            continue
        dims = [d or 0 for d in info.shape]
        spatial = dims[-2:] if len(dims) == 4 else dims[-1:]
        if max(spatial) > 16384 or max(dims) > 65536:
            detail = f"{name} {_fmt(info)}: > 16384 on the last/spatial axis or > 65536"
            yield (_finding("C2", op, detail) if op is not None
                   else Finding("C2", name, "input", detail, "FAIL"))


def _check_c3(graph: MilGraph, _: _Options, __: LintReport) -> Iterator[Finding]:
    for name, info in graph.inputs.items():
        if info.kind == "state" and info.shape and (info.shape[-1] or 0) % 32:
            yield Finding("C3", name, "state", f"state {_fmt(info)}: last dim "
                          f"{info.shape[-1]} is not a multiple of 32", "FB/FAIL")
    for op in _compute_ops(graph):
        # coreml_update_state is saved as write_state (+ read_state) in the package.
        if op.type in ("read_state", "write_state", "coreml_update_state"):
            state = graph.arg_info(op, "input") or graph.arg_info(op, "state")
            yield _finding("C3", op, f"{op.type} of {_fmt(state)}")


def _check_c5(graph: MilGraph, _: _Options, __: LintReport) -> Iterator[Finding]:
    enumerated = [e["name"] for e in describe_io(graph)["inputs"]
                  if "enumerated" in (e["flexible"] or {})]
    if enumerated:
        for op in _compute_ops(graph):
            if op.type == "layer_norm":
                yield _finding("C5", op, f"layer_norm with EnumeratedShapes inputs {enumerated}")


_INT_ARITHMETIC = {"add", "sub", "mul", "real_div", "floor_div", "mod", "pow", "maximum",
                   "minimum"}


def _check_c6(graph: MilGraph, _: _Options, __: LintReport) -> Iterator[Finding]:
    for op in _compute_ops(graph):
        ints = [info for _, info in _outputs(graph, op) if info.dtype.startswith(("int", "uint"))]
        if op.type in ("reduce_argmax", "reduce_argmin", "topk"):
            yield _finding("C6", op, f"{op.type} -> {', '.join(_fmt(i) for i in ints) or '?'}")
        elif op.type in _INT_ARITHMETIC and ints:
            yield _finding("C6", op, f"integer {op.type} -> {_fmt(ints[0])}")


# --- N1 ---------------------------------------------------------------------------------------

_NORMS = {"layer_norm", "batch_norm", "instance_norm", "l2_norm"}


def _check_n1(graph: MilGraph, _: _Options, __: LintReport) -> Iterator[Finding]:
    for op in _compute_ops(graph):
        if op.type in _NORMS:
            eps = graph.const_value(op, "epsilon")
            stored = graph.arg_info(op, "epsilon")
            if eps is not None and eps.size == 1 and float(eps.reshape(-1)[0]) < MIN_NORM_EPS:
                yield _finding("N1", op, f"epsilon {float(eps.reshape(-1)[0]):g} < "
                                         f"{MIN_NORM_EPS:g} (stored as {stored.dtype})")
        elif op.type in ("rsqrt", "sqrt", "inverse"):
            eps = _added_constant(graph, op)
            if eps is not None and eps < MIN_NORM_EPS:
                yield _finding("N1", op, f"{op.type}(x + {eps:g}): eps < {MIN_NORM_EPS:g} "
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


_CHECKS: tuple[Check, ...] = (
    _check_e1, _check_e2, _check_e3, _check_e4, _check_op_types, _check_weights, _check_e8,
    _check_e9, _check_e10, _check_blockwise, _check_lut, _check_c1, _check_c2, _check_c3,
    _check_c5, _check_c6, _check_n1,
)
