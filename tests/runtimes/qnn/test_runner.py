"""The ``qnn_context`` parity runner: a compiled context binary opened through the manifest
(:func:`mobile_sd.runtimes.component.open_component`), run in the HTP emulator."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from mobile_sd.errors import ParityError
from mobile_sd.runtimes.component import RuntimeSkip, open_component
from tests.helpers import manifests


def _manifest(folder, soc="SM8650", out_shape=(1, 16, 16, 16)):
    files = [{"path": "cgs.onnx", "format": "qnn_context", "backend": "qnn-htp"},
             {"path": "cgs_qnn.bin", "format": "qnn_bin", "backend": "qnn-htp"}]
    return manifests.typed({"format": "qnn", "backend": "htp", "recipe": {"soc": soc},
                            "components": {"unet": {
                                "files": files, "precision": "fp16", "soc": soc,
                                "inputs": [{"name": "x", "shape": [1, 8, 16, 16]}],
                                "outputs": [{"name": "out", "shape": list(out_shape)}]}}},
                           folder)


def test_skipped_without_plugin(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)      # import fails
    (tmp_path / "cgs.onnx").write_bytes(b"x")
    (tmp_path / "cgs_qnn.bin").write_bytes(b"x")
    with pytest.raises(RuntimeSkip, match="pip install onnxruntime-qnn==2.7.0"):
        open_component(tmp_path, _manifest(tmp_path), "unet")


def test_context_binary_runs_through_the_manifest(tmp_path):
    pytest.importorskip("onnxruntime_qnn", reason="onnxruntime-qnn not installed")
    from mobile_sd.runtimes.qnn import htp
    from tests.helpers.qnn_tiny_graphs import component, feeds, psnr

    model = component("conv_gn_silu")[0]
    ctx = htp.compile_context(model, tmp_path / "cgs.onnx", "SM8550")
    runner = open_component(tmp_path, _manifest(tmp_path, "SM8550"), "unet")
    assert runner.runtime == "qnn-htp"
    inputs, ref = feeds("conv_gn_silu", 0)
    out = runner(torch.from_numpy(inputs["x"]))[0].numpy()
    direct = htp.create_session(ctx.onnx_path, "SM8550").run(None, inputs)[0]
    np.testing.assert_array_equal(out, direct)
    assert psnr(out, ref) >= 40
    with pytest.raises(ParityError, match="shape"):
        open_component(tmp_path, _manifest(tmp_path, "SM8550", (1, 8, 16, 16)), "unet")
