"""QNN HTP EP: availability, context binaries (compile, reload, no overwrite), fallback naming."""
from __future__ import annotations

import numpy as np
import pytest

from mobile_sd.errors import InvalidArgumentError, OutputDirError, UnsupportedOpError
from mobile_sd.runtimes.qnn import htp


qnn = pytest.importorskip("onnxruntime_qnn", reason="onnxruntime-qnn not installed")
from tests.helpers.qnn_tiny_graphs import component, feeds, psnr, w8a16, workdir  # noqa: E402


def test_qairt_info():
    info = htp.require_htp()
    assert info["qairt"] == "2.51.0" and info["onnxruntime_qnn"] == "2.7.0"


@pytest.mark.parametrize("precision", ["fp16", "w8a16"])
def test_context_binary_reload_identical(precision, tmp_path):
    model = component("conv_gn_silu")[0] if precision == "fp16" else w8a16("conv_gn_silu")
    inputs, ref = feeds("conv_gn_silu", 0)
    ctx = htp.compile_context(model, tmp_path / "cgs.onnx", "SM8650", precision)
    assert ctx.onnx_path.is_file() and [p.name for p in ctx.bin_paths] == ["cgs_qnn.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cgs.onnx", "cgs_qnn.bin"]  # no temp
    manifest = ctx.manifest()
    assert manifest["ep_sdk_version"].startswith("v2.51.0") and manifest["soc_model"] == 57
    first = htp.create_session(ctx.onnx_path, "SM8650", precision).run(None, inputs)[0]
    second = htp.create_session(ctx.onnx_path, "SM8650", precision).run(None, inputs)[0]
    np.testing.assert_array_equal(first, second)
    direct = htp.create_session(model, "SM8650", precision).run(None, inputs)[0]
    np.testing.assert_array_equal(first, direct)
    assert psnr(first, ref) >= (40 if precision == "fp16" else 40)


def test_context_binary_not_overwritten(tmp_path):
    model = component("conv_gn_silu")[0]
    out = tmp_path / "c.onnx"
    htp.compile_context(model, out)
    before = out.read_bytes()
    with pytest.raises(OutputDirError, match="exists"):
        htp.compile_context(model, out)
    assert out.read_bytes() == before
    htp.compile_context(model, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.onnx", "c_qnn.bin"]


def test_precision_mismatch():
    with pytest.raises(InvalidArgumentError, match="QDQ"):
        htp.create_session(component("conv_gn_silu")[0], "SM8650", "w8a16")
    with pytest.raises(InvalidArgumentError, match="precision"):
        htp.create_session(component("conv_gn_silu")[0], "SM8650", "int4")


def _erf_graph(path):
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["a"], name="head_relu"),
             helper.make_node("Erf", ["a"], ["b"], name="mlp.erf"),
             helper.make_node("Mul", ["b", "a"], ["y"], name="tail_mul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    return path


def test_fallback_nodes_named(tmp_path):
    model = _erf_graph(tmp_path / "erf.onnx")
    report = htp.node_assignment(model, "SM8650", "fp16")
    assert not report.all_on_htp
    assert [(n.name, n.op_type) for n in report.fallback] == [("mlp.erf", "Erf")]
    assert "not supported by QNN EP" in report.fallback[0].reason
    assert report.htp_nodes == 2 and report.partitions == 2       # Relu | Erf on CPU | Mul
    with pytest.raises(UnsupportedOpError) as exc:
        htp.create_session(model, "SM8650", "fp16")
    assert "Erf 'mlp.erf'" in str(exc.value) and "SM8650" in str(exc.value)
    with pytest.raises(UnsupportedOpError, match="mlp.erf"):
        htp.compile_context(model, tmp_path / "ctx.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["erf.onnx"]   # nothing written
    out = htp.create_session(model, "SM8650", "fp16", strict=False).run(
        None, {"x": np.ones((1, 16), np.float32)})[0]
    assert out.shape == (1, 16)


def test_all_on_htp_report():
    report = htp.node_assignment(component("conv_gn_silu")[0], "SM8650", "fp16")
    assert report.all_on_htp and report.partitions == 1 and report.htp_nodes >= 4
    assert report.as_dict()["fallback"] == []
