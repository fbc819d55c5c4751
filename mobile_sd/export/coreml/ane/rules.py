"""The ANE lint's rule table (data: ``ane.md`` section 1) and its finding type.

See :mod:`mobile_sd.export.coreml.ane.lint` for the linter; the checks live in ``ane_checks*.py``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

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


@dataclass(frozen=True)
class LintOptions:
    expect_fp16: bool
    weight_limit: int
