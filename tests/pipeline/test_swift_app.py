"""The Swift app emulated in Python (mobile_sd.pipeline.swift_app): its tokenizer, RNG and
schedulers against the facts of apple/ml-stable-diffusion and diffusers, and the bug: a
v-prediction UNet in the app makes a wrong image unless ``v_to_epsilon`` rewrote it."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mobile_sd.errors import InvalidArgumentError
from mobile_sd.pipeline.swift_app import (SwiftBPETokenizer, SwiftComponents, SwiftConfiguration,
                                          SwiftDPMSolverMultistepScheduler, SwiftPNDMScheduler,
                                          diffusers_dpmpp_like_swift,
                                          image_to_uint8, numpy_rng_latents, run_swift_app)

PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def tok():
    return SwiftBPETokenizer.default()


@pytest.fixture(scope="module")
def model():
    from mobile_sd.models.zoo import build_model

    return build_model("snapfusion-tiny")


# ----------------------------------------------------------------------------- tokenizer, RNG

def test_tokenizer_matches_the_swift_package_test_ids(tok):
    # Expected ids from swift/StableDiffusionTests/StableDiffusionTests.swift (testBPETokenizer)
    assert tok.tokenize("a photo of an astronaut riding a horse on mars")[1] == [
        49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407]
    assert tok.tokenize("Apple CoreML developer tools on a Macbook Air are fast")[1] == [
        49406, 3055, 19622, 5780, 10929, 5771, 525, 320, 20617, 1922, 631, 1953, 49407]


def test_tokenizer_pads_with_eos_float32_and_differs_from_clip_where_documented(tok, model):
    from mobile_sd.models.tokenizer import tokenize

    ids = tok.input_ids(PROMPT)
    assert ids.dtype == np.float32 and ids.shape == (1, 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert set(ids[0, 7:].tolist()) == {49407}
    ours = tokenize(model.tokenizer, [PROMPT])
    assert ids.astype(np.int64).tolist() == ours.tolist()
    # punctuation glued to the word, no text cleaning: other ids than CLIP's
    for prompt in ["a cat, sitting", "a caf\u00e9 &amp; a cat"]:
        assert tok.input_ids(prompt).astype(np.int64).tolist() != \
            tokenize(model.tokenizer, [prompt]).tolist()
    # truncation keeps the first 77 tokens: no eos at the end
    long = tok.input_ids(" ".join(["cat"] * 100))
    assert long[0, 0] == 49406 and long[0, -1] == 2368
    assert tokenize(model.tokenizer, [" ".join(["cat"] * 100)])[0, -1] == 49407


def test_numpy_rng_matches_the_swift_package_test_values():
    # numpy.random.seed(12345); randn(10000)[-5:] (StableDiffusionTests.swift)
    draws = numpy_rng_latents(12345, (10000,))
    assert np.allclose(draws[-5:], [-0.86285345, 2.15229409, -0.00670556, -1.21472309,
                                    0.65498866], atol=1e-6)


# ----------------------------------------------------------------------------- schedulers

def test_swift_timesteps():
    assert SwiftDPMSolverMultistepScheduler(8).time_steps == [999, 874, 749, 624, 500, 375,
                                                              250, 125]
    assert SwiftDPMSolverMultistepScheduler(8, timestep_spacing="leading").time_steps == [
        889, 778, 667, 556, 445, 334, 223, 112]
    # PNDM (the app's default scheduler): steps_offset 1, first timestep twice, n + 1 calls
    assert SwiftPNDMScheduler(8).time_steps == [876, 751, 751, 626, 501, 376, 251, 126, 1]
    # half-way cases round away from zero in Swift; diffusers' linspace rounds half to even
    from diffusers import DPMSolverMultistepScheduler

    assert SwiftDPMSolverMultistepScheduler(6).time_steps == [999, 833, 666, 500, 333, 167]
    stock = DPMSolverMultistepScheduler(timestep_spacing="linspace")
    stock.set_timesteps(6)
    assert stock.timesteps.tolist() == [999, 832, 666, 500, 333, 166]


def _stub_eps(x, t):
    """A deterministic epsilon 'model' that numpy and torch evaluate alike."""
    return 0.6 * x + 0.2 * math.sin(t / 90.0)


def _run_swift(steps, x0):
    s = SwiftDPMSolverMultistepScheduler(steps)
    x = x0.copy()
    for t in s.time_steps:
        x = s.step(_stub_eps(x, t).astype(np.float32), t, x)
    return s.model_outputs[-1], s


def _run_diffusers(scheduler, x0):
    x = torch.from_numpy(x0.copy())
    for t in scheduler.timesteps:
        x = scheduler.step(_stub_eps(x, int(t)), t, x).prev_sample
    return x.numpy()


@pytest.mark.parametrize("steps", [8, 20])
def test_swift_dpmpp_equals_diffusers_configured_like_swift(steps):
    x0 = numpy_rng_latents(1, (1, 4, 8, 8))
    swift, s = _run_swift(steps, x0)
    theirs = _run_diffusers(diffusers_dpmpp_like_swift("epsilon", steps), x0)
    assert [int(t) for t in diffusers_dpmpp_like_swift("epsilon", steps).timesteps] == s.time_steps
    assert np.abs(swift - theirs).max() <= 1e-4 * np.abs(theirs).max()


def test_stock_diffusers_differs_below_15_steps_only_by_the_second_to_last_order():
    """Swift takes the second-to-last step at first order below 15 steps; stock diffusers
    (lower_order_final) takes it at second order: a real, small difference."""
    from diffusers import DPMSolverMultistepScheduler

    x0 = numpy_rng_latents(1, (1, 4, 8, 8))
    swift, s = _run_swift(8, x0)
    stock = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                        beta_end=0.012, prediction_type="epsilon",
                                        final_sigmas_type="zero")
    stock.set_timesteps(timesteps=s.time_steps)
    theirs = _run_diffusers(stock, x0)
    assert np.abs(swift - theirs).max() > 1e-3 * np.abs(theirs).max()


# ----------------------------------------------------------------------------- the app

def test_serial_batch1_unet_path_equals_batch2(tok):
    """A batch-1 UNet (latentSampleShape[0] == 1) is called twice per step, uncond first."""
    calls = []

    def te(ids):
        return np.tile(ids[..., None] / 5e4, (1, 1, 8)).astype(np.float32)

    def unet(x, t, ehs):
        calls.append(x.shape[0])
        return (0.5 * x + ehs.mean(axis=(1, 2, 3)).reshape(-1, 1, 1, 1)).astype(np.float32)

    def dec(z):
        return np.tanh(np.repeat(z[:, :3], 2, axis=2).repeat(2, axis=3))
    cfg = SwiftConfiguration("a dog", step_count=4, guidance_scale=3.0, scheduler="dpmpp")
    two = run_swift_app(SwiftComponents(te, unet, dec, (2, 4, 4, 4)), cfg, tok)
    one = run_swift_app(SwiftComponents(te, unet, dec, (1, 4, 4, 4)), cfg, tok)
    assert calls == [2] * 4 + [1] * 8 and one.unet_calls == 8
    assert np.allclose(one.denoised_latents, two.denoised_latents, atol=1e-6)
    with pytest.raises(InvalidArgumentError, match="guidance >= 1"):
        run_swift_app(SwiftComponents(te, unet, dec, (2, 4, 4, 4)),
                      SwiftConfiguration("a dog", step_count=4, guidance_scale=0.5,
                                         scheduler="dpmpp"), tok)


def test_image_conversion():
    img = np.array([-1.5, -1.0, 0.0, 1.0, 2.0], np.float32).reshape(1, 1, 1, 5).repeat(3, 1)
    assert image_to_uint8(img)[0, :, 0].tolist() == [0, 0, 128, 255, 255]
