"""ane_lint: tiny torch / MIL models that trigger each static rule, and ones that do not."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from mobile_sd.errors import ExportError
from mobile_sd.export.coreml.ane.lint import HEADER_NOTE, RULES, RULES_BY_ID, lint_package

ct = pytest.importorskip("coremltools")
from tests.helpers.paths import DOCS  # noqa: E402

# The rule table with its public sources, shipped in the repository.
ANE_MD = DOCS / "ane.md"


def _convert(module, args, precision="float16", target="iOS17", dynamic_shapes=None, **kwargs):
    exported = torch.export.export(module.eval(), args, dynamic_shapes=dynamic_shapes)
    return ct.convert(exported.run_decompositions({}), convert_to="mlprogram",
                      minimum_deployment_target=getattr(ct.target, target),
                      compute_precision=getattr(ct.precision, precision.upper()), **kwargs)


def _rules(report) -> set[str]:
    return {f.rule for f in report.findings}


class Attention(nn.Module):
    """softmax(q k^T) v on (B, S, C), one head: no transposes, no reshapes."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 8)

    def forward(self, x):
        return torch.softmax(self.q(x) @ x.transpose(-1, -2) * 0.35, dim=-1) @ x


class MultiHead(nn.Module):
    """The diffusers layout: reshape + transpose to (B, H, S, d) around QK^T."""

    def forward(self, q, k):
        b, s, c = q.shape
        q = q.reshape(b, s, 2, c // 2).transpose(1, 2)
        k = k.reshape(b, s, 2, c // 2).transpose(1, 2)
        out = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ k
        return out.transpose(1, 2).reshape(b, s, c)


class Rank5(nn.Module):
    def forward(self, x):
        return (x.reshape(1, 2, 2, 2, 4) * 2).reshape(1, 4, 8)


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.tiny = nn.LayerNorm(8, eps=1e-9)
        self.fine = nn.LayerNorm(8, eps=1e-5)

    def forward(self, x):
        return self.fine(self.tiny(x))


class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Save a model and return its package path (lint_package reads what ships)."""
    folder = tmp_path_factory.mktemp("lint")

    def save(model, name):
        path = folder / f"{name}.mlpackage"
        model.save(str(path))
        return path
    return save


@pytest.fixture(scope="module")
def attention_fp16(saved):
    return {length: saved(_convert(Attention(), (torch.randn(1, length, 8),)), f"attn{length}")
            for length in (256, 1024)}


@pytest.fixture(scope="module")
def conv_ios18():
    return _convert(Conv(), (torch.randn(1, 8, 8, 8),), target="iOS18")


def _palettize(model, **config):
    from coremltools.optimize import coreml as cto

    return cto.palettize_weights(model, cto.OptimizationConfig(
        global_config=cto.OpPalettizerConfig(mode="uniform", weight_threshold=0, **config)))


def test_rule_table_matches_ane_md():
    """id, basis and source exactly as in ane.md; severity as its first word(s)."""
    rows = {}
    for line in ANE_MD.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and re.fullmatch(r"[ECN]\d+", cells[0]):
            rows[cells[0]] = cells
    assert set(rows) == set(RULES_BY_ID)
    for rule in RULES:
        _, _, severity, basis, source = rows[rule.id]
        assert source == rule.source and basis == rule.basis, rule.id
        assert severity.startswith(rule.severity), rule.id


def test_fp32_precision_triggers_e1_and_fp16_does_not(attention_fp16):
    fp32 = lint_package(_convert(Attention(), (torch.randn(1, 16, 8),), precision="float32"))
    e1 = fp32.by_rule("E1")
    assert {f.op_type for f in e1} >= {"linear", "matmul", "softmax"}
    assert "float32[1, 16, 16]" in next(f.detail for f in e1 if f.op_type == "softmax")
    # fp16: the fp32 input is cast once at the edge, which is not a finding.
    assert "E1" not in _rules(lint_package(attention_fp16[256]))
    assert "E1" not in _rules(lint_package(_convert(Attention(), (torch.randn(1, 16, 8),),
                                                    precision="float32"), expect_fp16=False))


def test_rank5_tensor_is_an_e2_note(saved):
    report = lint_package(saved(_convert(Rank5(), (torch.randn(1, 4, 8),)), "rank5"))
    e2 = report.by_rule("E2")
    assert e2 and {f.severity for f in e2} == {"note"}
    assert "rank 5 float16[1, 2, 2, 2, 4]" in e2[0].detail


def test_rank6_tensor_is_an_e2_failure():
    """coremltools refuses rank 6 at conversion, so edit a spec to get one."""
    model = _convert(Rank5(), (torch.randn(1, 4, 8),))
    spec = model.get_spec()
    block = spec.mlProgram.functions["main"].block_specializations["CoreML7"]
    op = next(op for op in block.operations if op.type == "mul")
    tensor = op.outputs[0].type.tensorType
    tensor.dimensions.add().constant.size = 1
    tensor.rank = 6
    e2 = lint_package(spec).by_rule("E2")
    assert [f.severity for f in e2 if f.op_type == "mul"] == ["FAIL"]


def test_range_dim_input_triggers_e3_and_static_does_not(attention_fp16):
    flexible = _convert(Attention(), (torch.randn(1, 16, 8),),
                        dynamic_shapes={"x": {1: torch.export.Dim("seq", min=1, max=64)}},
                        inputs=[ct.TensorType(name="x", shape=(1, ct.RangeDim(1, 64), 8))])
    e3 = lint_package(flexible).by_rule("E3")
    assert [(f.op_name, f.op_type) for f in e3] == [("x", "input")]
    assert "[1, 64]" in e3[0].detail
    assert "E3" not in _rules(lint_package(attention_fp16[256]))


def test_runtime_shape_reshape_triggers_e4():
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import get_new_symbol

    # Two flexible dims: the reshape's shape cannot fold to a const with a single -1.
    @mb.program(input_specs=[mb.TensorSpec(shape=(get_new_symbol(), get_new_symbol(), 8))],
                opset_version=ct.target.iOS17)
    def prog(x):
        leading = mb.slice_by_size(x=mb.shape(x=x), begin=np.array([0], np.int32),
                                   size=np.array([2], np.int32))
        return mb.reshape(x=x, shape=mb.concat(values=[leading, np.array([2, 4], np.int32)],
                                               axis=0))

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
                       inputs=[ct.TensorType(name="x", shape=(ct.RangeDim(1, 4),
                                                              ct.RangeDim(1, 8), 8))])
    e4 = lint_package(model).by_rule("E4")
    assert [f.op_type for f in e4] == ["reshape"] and "computed by concat" in e4[0].detail


def test_lstm_and_scatter_trigger_e5_e6():
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(4, 1, 8))], opset_version=ct.target.iOS17)
    def prog(x):
        zeros = np.zeros((1, 8), np.float32)
        weights = np.random.rand(32, 8).astype(np.float32)
        out, _, _ = mb.lstm(x=x, initial_h=zeros, initial_c=zeros, weight_ih=weights,
                            weight_hh=weights, output_sequence=True)
        rows = mb.squeeze(x=out, axes=[1])
        return mb.scatter(data=rows, indices=np.array([0, 1], np.int32),
                          updates=mb.slice_by_index(x=rows, begin=[0, 0], end=[2, 8]), axis=0)

    report = lint_package(ct.convert(prog, convert_to="mlprogram",
                                     minimum_deployment_target=ct.target.iOS17))
    assert [f.op_type for f in report.by_rule("E5")] == ["lstm"]
    assert [f.op_type for f in report.by_rule("E6")] == ["scatter"]


def test_weight_limit_triggers_e7(attention_fp16):
    assert "E7" not in _rules(lint_package(attention_fp16[256]))
    e7 = lint_package(attention_fp16[256], weight_limit_bytes=64).by_rule("E7")
    assert len(e7) == 1 and e7[0].op_type == "weights" and e7[0].severity == "FAIL"


def test_long_query_triggers_e9_and_short_does_not(attention_fp16):
    e9 = lint_package(attention_fp16[1024]).by_rule("E9")
    assert len(e9) == 1 and e9[0].op_type == "matmul"
    assert "query length 1024 > 512 unchunked" in e9[0].detail
    assert "E9" not in _rules(lint_package(attention_fp16[256]))


def test_heads_and_transposes_around_qkt_trigger_e9():
    model = _convert(MultiHead(), (torch.randn(1, 64, 16), torch.randn(1, 64, 16)))
    (finding,) = lint_package(model).by_rule("E9")
    assert "2 heads in one matmul" in finding.detail
    assert "transpose/reshape around QK^T: transpose" in finding.detail


def test_embedding_lookup_triggers_e10():
    model = _convert(nn.Embedding(100, 8), (torch.randint(0, 100, (1, 8), dtype=torch.int32),))
    (finding,) = lint_package(model).by_rule("E10")
    assert finding.op_type == "gather" and finding.detail.startswith("embedding lookup")


def test_small_layer_norm_eps_triggers_n1(saved):
    report = lint_package(saved(_convert(Norms(), (torch.randn(1, 4, 8),)), "norms"))
    (finding,) = report.by_rule("N1")       # eps 1e-5 passes; 1e-9 is a subnormal in fp16
    assert finding.op_type == "layer_norm" and "< 1e-07" in finding.detail


def test_3bit_lut_triggers_e13_and_4bit_does_not(conv_ios18, saved):
    (finding,) = lint_package(saved(_palettize(conv_ios18, nbits=3), "lut3")).by_rule("E13")
    assert finding.op_type == "constexpr_lut_to_dense" and finding.detail.startswith("3-bit LUT")
    assert "E13" not in _rules(lint_package(_palettize(conv_ios18, nbits=4)))


def test_small_lut_groups_trigger_e13(conv_ios18):
    grouped = _palettize(conv_ios18, nbits=4, granularity="per_grouped_channel", group_size=4)
    (finding,) = lint_package(grouped).by_rule("E13")
    assert "4 LUTs, one per 4 channels (< 8)" in finding.detail


def test_per_block_int4_triggers_e12():
    from coremltools.optimize import coreml as cto

    model = _convert(nn.Linear(32, 16), (torch.randn(1, 32),), target="iOS18")
    config = cto.OpLinearQuantizerConfig(dtype="int4", granularity="per_block", block_size=8,
                                         weight_threshold=0)
    quantized = cto.linear_quantize_weights(model, cto.OptimizationConfig(global_config=config))
    (finding,) = lint_package(quantized).by_rule("E12")
    assert "int4[16, 32] scale float16[16, 4] (axis 1: blocks of 8)" in finding.detail


def test_dilation_and_4x_upsample_trigger_c1():
    class Dilated(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=2, dilation=2)

        def forward(self, x):
            return nn.functional.interpolate(self.conv(x), scale_factor=4, mode="nearest")

    c1 = lint_package(_convert(Dilated(), (torch.randn(1, 4, 8, 8),))).by_rule("C1")
    assert [(f.op_type, f.detail.split(":")[0]) for f in c1] == [
        ("conv", "dilations [2, 2]"), ("upsample_nearest_neighbor", "upsample x4")]


def test_state_ops_and_unaligned_state_trigger_c3():
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    @mb.program(input_specs=[mb.TensorSpec((1, 30), dtype=types.fp16),
                             mb.StateTensorSpec((1, 30), dtype=types.fp16)],
                opset_version=ct.target.iOS18)
    def prog(x, cache):
        total = mb.add(x=x, y=mb.read_state(input=cache))
        mb.coreml_update_state(state=cache, value=total)
        return total

    c3 = lint_package(ct.convert(prog, convert_to="mlprogram",
                                 minimum_deployment_target=ct.target.iOS18)).by_rule("C3")
    assert [f.op_type for f in c3] == ["state", "read_state", "write_state"]
    assert "last dim 30 is not a multiple of 32" in c3[0].detail


def test_report_renders_json_and_markdown(attention_fp16):
    report = lint_package(attention_fp16[1024])
    data = json.loads(json.dumps(report.to_dict()))
    assert data["counts"]["E9"] == 1 and set(data["counts"]) == set(RULES_BY_ID)
    assert data["note"] == HEADER_NOTE and data["findings"][0]["rule"]
    markdown = report.to_markdown()
    assert "| rule | warnings | severity | basis | source |" in markdown
    assert "All findings are warnings" in markdown
    assert "| E9 | 1 | SLOW | E | [A] 2-3; [SD] attention.py |" in markdown
    assert "## E9 (1)" in markdown


def test_missing_package_raises_export_error(tmp_path):
    with pytest.raises(ExportError, match="no such Core ML model"):
        lint_package(tmp_path / "missing.mlpackage")
