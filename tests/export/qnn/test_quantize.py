"""w8a16 quantization: the graph surgery keeps fp32 numerics; calibration input checks."""
from __future__ import annotations

import numpy as np
import pytest

from mobile_sd.errors import CalibrationError, ExportError
from mobile_sd.export.qnn.quantize import clamp_additive_masks, prepare_for_htp, quantize_w8a16
from tests.helpers.qnn_tiny_graphs import calibration, component, feeds


def _cpu(model, inputs):
    import onnxruntime as ort

    data = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, inputs)[0]


def test_mask_clamp_keeps_clip_numerics():
    import onnx

    path = component("clip")[0]
    original = onnx.load(str(path))
    prepared, report = prepare_for_htp(original)
    assert report["masks_clamped"], "the causal mask constant should have been found"
    assert clamp_additive_masks(prepared) == []                  # idempotent
    for seed in range(3):
        inputs, ref = feeds("clip", seed)
        a, b = _cpu(original, inputs), _cpu(prepared, inputs)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
        np.testing.assert_allclose(b, ref, rtol=0, atol=1e-4)


def _erf_gelu_graph():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    c = {n: numpy_helper.from_array(np.array(v, np.float32), n)
         for n, v in (("sqrt2", np.sqrt(2.0)), ("one", 1.0), ("half", 0.5))}
    nodes = [helper.make_node("Div", ["x", "sqrt2"], ["d"]),
             helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["a"]),
             helper.make_node("Mul", ["x", "a"], ["m"]),
             helper.make_node("Mul", ["m", "half"], ["y"])]
    graph = helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 64])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, 64])], initializer=list(c.values()))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_gelu_fusion_keeps_numerics_and_runs_on_htp(tmp_path):
    import onnx

    model = _erf_gelu_graph()
    prepared, report = prepare_for_htp(model)
    assert report["gelu_fused"]
    assert "Erf" not in {n.op_type for n in prepared.graph.node}
    x = {"x": np.linspace(-6, 6, 64, dtype=np.float32)[None]}
    np.testing.assert_allclose(_cpu(prepared, x), _cpu(model, x), rtol=0, atol=1e-6)
    pytest.importorskip("onnxruntime_qnn", reason="onnxruntime-qnn not installed")
    from mobile_sd.runtimes.qnn import htp

    onnx.save(model, str(tmp_path / "erf.onnx"))
    onnx.save(prepared, str(tmp_path / "gelu.onnx"))
    # in a float graph the QNN EP fuses the Erf-GELU chain itself (a lone Erf falls back, see
    # tests/runtimes/qnn/test_htp.py); fusing before quantization keeps GELU one QDQ node unit
    assert htp.node_assignment(tmp_path / "erf.onnx").all_on_htp
    assert htp.node_assignment(tmp_path / "gelu.onnx").all_on_htp


def test_calibration_checked(tmp_path):
    path = component("conv_gn_silu")[0]
    with pytest.raises(CalibrationError, match="no calibration samples"):
        quantize_w8a16(path, tmp_path / "q.onnx", [])
    with pytest.raises(CalibrationError, match="inputs"):
        quantize_w8a16(path, tmp_path / "q.onnx", [{"y": np.zeros((1, 8, 16, 16), np.float32)}])
    with pytest.raises(CalibrationError, match=r"shape \[1, 8, 4, 4\]"):
        quantize_w8a16(path, tmp_path / "q.onnx", [{"x": np.zeros((1, 8, 4, 4), np.float32)}])
    with pytest.raises(CalibrationError, match="float64"):
        quantize_w8a16(path, tmp_path / "q.onnx", [{"x": np.zeros((1, 8, 16, 16))}])
    assert list(tmp_path.iterdir()) == []


def test_old_opset_refused(tmp_path):
    old = _erf_gelu_graph()
    old.opset_import[0].version = 18
    with pytest.raises(ExportError, match="opset >= 21"):
        quantize_w8a16(old, tmp_path / "q.onnx", [{"x": np.zeros((1, 64), np.float32)}])


def test_quantize_writes_qdq(tmp_path):
    import onnx

    out = tmp_path / "q.onnx"
    info = quantize_w8a16(component("conv_gn_silu")[0], out, calibration("conv_gn_silu", 4))
    assert info["scheme"] == "w8a16" and info["calibration_samples"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]
    model = onnx.load(str(out))
    zps = {init.name: init.data_type for init in model.graph.initializer
           if init.name.endswith("zero_point")}
    assert onnx.TensorProto.UINT16 in zps.values() and onnx.TensorProto.UINT8 in zps.values()


def test_split_calibration_gives_what_one_shot_quantize_gives(tmp_path):
    """quantize_w8a16 calibrates first and quantizes from ORT's range cache (one model copy
    in memory at a time); the QDQ model must equal ORT's one-shot ``quantize`` with the same
    config on the same prepared model: every initializer (weights, scales, zero points)."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    from mobile_sd.export.qnn.quantize import make_reader

    path = component("clip")[0]
    ours = tmp_path / "ours.onnx"
    quantize_w8a16(path, ours, calibration("clip"))
    prepared, _ = prepare_for_htp(path)
    onnx.save_model(prepared, str(tmp_path / "prepared.onnx"))
    config = get_qnn_qdq_config(str(tmp_path / "prepared.onnx"), make_reader(calibration("clip")),
                                activation_type=QuantType.QUInt16, weight_type=QuantType.QUInt8)
    quantize(str(tmp_path / "prepared.onnx"), str(tmp_path / "one_shot.onnx"), config)

    def initializers(p):
        return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(p)).graph.initializer}
    a, b = initializers(ours), initializers(tmp_path / "one_shot.onnx")
    assert a.keys() == b.keys() and len(a) > 50
    assert all(np.array_equal(a[k], b[k]) for k in a)
