"""Tiny UNet / CLIP text encoder / VAE decoder -> fp16 and w8a16 context binaries per SoC, run
in the HTP emulator with CPU fallback disabled, PSNR vs torch fp32.

Measured (QAIRT 2.51 emulator, SM8650; other SoCs within 0.5 dB): fp16 63.6 / 66.8 / 66.8 dB,
w8a16 32.6 / 30.8 / 50.1 dB (UNet / CLIP / VAE decoder). The w8a16 gates sit ~4 dB under.
"""
from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime_qnn", reason="onnxruntime-qnn not installed")

from mobile_sd.runtimes.qnn import htp  # noqa: E402
from mobile_sd.runtimes.qnn.socs import SOCS  # noqa: E402
from tests.helpers.qnn_tiny_graphs import component, feeds, psnr, w8a16, workdir  # noqa: E402

FP16_MIN_DB = 40.0
W8A16_MIN_DB = {"unet": 28.0, "clip": 26.0, "vae_decoder": 45.0}


@pytest.mark.parametrize("soc", sorted(SOCS))
@pytest.mark.parametrize("name", ["unet", "clip", "vae_decoder"])
def test_component_context_binaries(name, soc):
    inputs, ref = feeds(name, 0)
    results = {}
    for precision, model in (("fp16", component(name)[0]), ("w8a16", w8a16(name))):
        ctx = htp.compile_context(model, workdir() / soc / f"{name}_{precision}.onnx", soc,
                                  precision, overwrite=True)
        sess = htp.create_session(ctx.onnx_path, soc, precision)      # strict
        assert htp.session_assignment(sess).all_on_htp
        results[precision] = psnr(sess.run(None, inputs)[0], ref)
    print(f"{name} {soc}: fp16 {results['fp16']:.1f} dB, w8a16 {results['w8a16']:.1f} dB")
    assert results["fp16"] >= FP16_MIN_DB
    assert results["w8a16"] >= W8A16_MIN_DB[name]
