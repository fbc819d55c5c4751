"""Reference pipeline: DDIM + CFG, determinism, recording, CLI and its bad inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mobile_sd.errors import InvalidArgumentError
from mobile_sd.models.folder import load_model_folder
from mobile_sd.pipeline.recorder import Recorder
from mobile_sd.pipeline.reference import generate


@pytest.fixture(scope="module")
def tiny_model(tiny_folder):
    return load_model_folder(tiny_folder)


def test_generate_is_deterministic_and_records_every_call(tiny_model, tmp_path):
    rec = Recorder()
    a = generate(tiny_model, "a red bicycle", steps=4, guidance=4.5, seed=3, recorder=rec,
                 progress=False)
    b = generate(tiny_model, "a red bicycle", steps=4, guidance=4.5, seed=3, progress=False)
    c = generate(tiny_model, "a red bicycle", steps=4, guidance=4.5, seed=4, progress=False)
    assert a.image.shape == (128, 128, 3) and a.image.dtype == np.uint8
    assert np.array_equal(a.image, b.image) and not np.array_equal(a.image, c.image)
    assert len(a.timesteps) == 4 and a.timesteps[0] == 999  # trailing spacing
    assert [c.component for c in rec.calls()] == ["text_encoder"] * 2 + ["unet"] * 4 + ["decoder"]
    unet_call = rec.calls("unet")[0]
    assert unet_call.inputs["sample"].shape == (2, 4, 16, 16)  # both CFG branches
    assert unet_call.inputs["encoder_hidden_states"].shape == (2, 77, 32)
    # The recording is what the model computed: re-running the UNet on it reproduces it.
    with torch.no_grad():
        again = tiny_model.unet(*(unet_call.inputs[k] for k in ("sample", "timestep",
                                                                 "encoder_hidden_states")))
    assert torch.equal(again, unet_call.outputs["noise_pred"])
    path = rec.save(tmp_path / "rec.safetensors")
    loaded = Recorder.load(path)
    assert [c.info.get("step") for c in loaded.calls("unet")] == [0, 1, 2, 3]
    assert torch.equal(loaded.calls("decoder")[0].outputs["image"],
                       rec.calls("decoder")[0].outputs["image"])
    assert len(loaded.input_tuples("unet", ["sample", "timestep"])) == 4


def test_guidance_changes_output_and_one_disables_cfg(tiny_model):
    rec = Recorder()
    a = generate(tiny_model, "a cat", steps=2, guidance=1.0, recorder=rec, progress=False)
    b = generate(tiny_model, "a cat", steps=2, guidance=8.0, progress=False)
    assert rec.calls("unet")[0].inputs["sample"].shape[0] == 1
    assert len(rec.calls("text_encoder")) == 1
    assert not np.array_equal(a.image, b.image)


def test_epsilon_model_with_leading_spacing(sd15_tiny_folder):
    model = load_model_folder(sd15_tiny_folder)
    assert model.spec.scheduler.prediction_type == "epsilon"
    result = generate(model, "a cat", steps=3, guidance=7.5, progress=False)
    assert result.timesteps == [667, 334, 1]  # leading spacing, steps_offset 1
    assert np.isfinite(result.latents.numpy()).all()


@pytest.mark.parametrize("steps,guidance,message", [
    (0, 4.5, "--steps must be an integer in 1..1000, got 0"),
    (1001, 4.5, "--steps must be an integer in 1..1000"),
    (8, -1.0, "--guidance must be a finite number >= 0"),
    (8, float("nan"), "--guidance must be a finite number >= 0"),
])
def test_invalid_steps_and_guidance(tiny_model, steps, guidance, message):
    with pytest.raises(InvalidArgumentError, match=message.replace(".", r"\.")):
        generate(tiny_model, "x", steps=steps, guidance=guidance, progress=False)


def test_cli_init_then_generate_writes_png(tmp_path, cli):
    from PIL import Image

    folder = tmp_path / "model"
    code, out, _ = cli("init", "--spec", "snapfusion-tiny", "--out", folder)
    assert code == 0 and "Random weights make noise images" in out
    code, out, _ = cli("generate", "--model", folder, "--prompt", "a cat", "--steps", "2",
                       "--out", tmp_path / "img.png", "--record", tmp_path / "rec.safetensors",
                       "--quiet")
    assert code == 0, out
    assert Image.open(tmp_path / "img.png").size == (128, 128)
    assert len(Recorder.load(tmp_path / "rec.safetensors").calls("unet")) == 2


@pytest.mark.parametrize("args,message", [
    (["generate", "--spec", "nope", "--prompt", "x"], "unknown spec 'nope'; valid specs:"),
    (["generate", "--model", "/no/such/dir", "--prompt", "x"], "/no/such/dir: no such model folder"),
    (["generate", "--spec", "snapfusion-tiny", "--prompt", "x", "--steps", "0"], "--steps must be"),
    (["generate", "--spec", "snapfusion-tiny", "--prompt", "x", "--guidance", "-2"], "--guidance must be"),
    (["init", "--spec", "nope", "--out", "/tmp/x"], "unknown spec 'nope'"),
])
def test_cli_bad_input_is_one_line_exit_2(cli, args, message):
    code, _, err = cli(*args)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("mobile-sd: error: ") and message in err
