"""Apple's Swift app emulated on real components (mobile_sd.parity.swift_app): the eager
modules with and without ``v_to_epsilon``, and exported bundles from their own files only
(vocab.json, merges.txt, the packages) through the MIL runtime, against the fp32 PyTorch
pipeline with the app's scheduler (DPM-Solver++ as the Swift package sets it up)."""
from __future__ import annotations

import json

import pytest

from mobile_sd.errors import ParityError
from mobile_sd.parity.swift_app import check_bundle, eager_swift_components, run_bundle
from mobile_sd.pipeline.swift_app import (SwiftBPETokenizer, SwiftConfiguration, psnr,
                                          reference_dpmpp, run_swift_app)
from tests.helpers.mil_exports import copy_export, export

PROMPT = "a photo of a cat"
SPEC = "snapfusion-tiny"


@pytest.fixture(scope="module")
def model():
    from mobile_sd.models.zoo import build_model

    return build_model(SPEC)


@pytest.fixture(scope="module")
def tok():
    return SwiftBPETokenizer.default()


def test_app_with_v_to_epsilon_matches_reference_and_without_it_is_wrong(model, tok):
    """The issue: SnapFusion's UNet predicts v; the app treats the output as epsilon."""
    assert model.spec.scheduler.prediction_type == "v_prediction"
    cfg = SwiftConfiguration(PROMPT, step_count=8, guidance_scale=4.5, scheduler="dpmpp", seed=0)
    ref = reference_dpmpp(model, PROMPT, steps=8, guidance=4.5, seed=0)
    fixed = run_swift_app(eager_swift_components(model, v_to_epsilon=True), cfg, tok)
    broken = run_swift_app(eager_swift_components(model, v_to_epsilon=False), cfg, tok)
    assert fixed.timesteps == ref.timesteps == [999, 874, 749, 624, 500, 375, 250, 125]
    good, bad = psnr(fixed.image, ref.image), psnr(broken.image, ref.image)
    print(f"image PSNR vs fp32 reference: with v_to_epsilon {good:.1f} dB, without {bad:.1f} dB")
    assert good >= 30
    assert bad < 20 and good - bad > 20


def test_fp16_bundle_in_the_app_matches_the_fp32_pipeline(model):
    """The gate: the fp16 bundle (UNet in two chunks, chained by name) >= 30 dB image PSNR."""
    folder = export("test-ios-fp16-chunked", SPEC)
    result = check_bundle(folder, model, PROMPT, seed=0)
    print(f"fp16 bundle in the app: {result['psnr_db']:.1f} dB, SSIM {result['ssim']:.4f}")
    assert result["timesteps"] == [999, 874, 749, 624, 500, 375, 250, 125]
    assert result["psnr_db"] >= 30 and set(result["component_seconds"]) == {
        "text_encoder", "unet", "decoder"}


@pytest.mark.parametrize("recipe", ["ios-snapfusion-swift", "ios-snapfusion-fast"])
def test_six_bit_bundle_in_the_app_is_reported(recipe, model):
    result = check_bundle(export(recipe, SPEC), model, PROMPT, seed=0)
    print(f"{recipe} (6-bit) in the app: {result['psnr_db']:.1f} dB, SSIM {result['ssim']:.4f}")
    assert result["psnr_db"] > 20     # reported; a v/epsilon mix-up gives < 20 (test above)


def test_the_app_uses_only_the_bundle_files_and_its_manifest_settings(tmp_path):
    folder = copy_export(export("ios-snapfusion-swift", SPEC), tmp_path / "bundle")
    settings = json.loads((folder / "manifest.json").read_text())["pipeline"]["swift_app"]
    assert settings == {"scheduler": "dpmpp", "steps": 8, "guidance": 4.5,
                        "timestep_spacing": "linspace", "rng": "numpy", "unet_output": "epsilon",
                        "model_prediction_type": "v_prediction", "decoder_scale_factor": 0.18215}
    (folder / "reference_io.safetensors").unlink()        # not the app's: not needed
    image = run_bundle(folder, PROMPT, steps=2).image
    assert image.shape == (64, 64, 3)
    (folder / "merges.txt").unlink()
    with pytest.raises(ParityError, match="merges.txt"):
        run_bundle(folder, PROMPT, steps=2)


def test_a_bundle_without_swift_settings_is_refused(tmp_path):
    folder = copy_export(export("ios-snapfusion-swift", SPEC), tmp_path / "bundle")
    data = json.loads((folder / "manifest.json").read_text())
    del data["pipeline"]["swift_app"]
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ParityError, match="no pipeline.swift_app"):
        run_bundle(folder, PROMPT)
