"""The shared parity metrics: known values, edge cases, SSIM properties."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mobile_sd.metrics import (INF_DB, cosine, image_stats, psnr_db, sqnr_db, ssim,
                                      tensor_stats, worst)


def test_psnr_uses_the_reference_peak_like_apple():
    ref = torch.tensor([2.0, -4.0, 1.0, 0.0])
    test = ref + torch.tensor([0.1, -0.1, 0.1, -0.1])
    # peak = max |ref| = 4, mse = 0.01 -> 10 log10(16 / 0.01)
    assert psnr_db(ref, test) == pytest.approx(10 * math.log10(16 / 0.01))
    assert psnr_db(ref, test, data_range=2.0) == pytest.approx(10 * math.log10(4 / 0.01))


def test_sqnr_is_signal_over_noise_power():
    ref = torch.tensor([3.0, -3.0, 3.0, -3.0])
    assert sqnr_db(ref, ref * 1.1) == pytest.approx(10 * math.log10(9 / 0.09))


def test_identical_tensors_give_finite_ceiling():
    ref = torch.randn(10)
    stats = tensor_stats(ref, ref.clone())
    assert stats["psnr_db"] == INF_DB and stats["sqnr_db"] == INF_DB
    assert stats["max_abs"] == 0 and stats["cosine"] == pytest.approx(1.0)


def test_cosine_and_errors():
    ref = np.array([1.0, 0.0])
    assert cosine(ref, np.array([0.0, 1.0])) == pytest.approx(0.0)
    assert cosine(ref, -ref) == pytest.approx(-1.0)
    stats = tensor_stats(ref, np.array([1.5, -0.5]))
    assert stats["max_abs"] == 0.5 and stats["mean_abs"] == 0.5


def test_nonfinite_output_is_worst_case():
    stats = tensor_stats(torch.ones(4), torch.tensor([1.0, float("nan"), 1.0, float("inf")]))
    assert stats["nonfinite"] == 2 and stats["psnr_db"] == -INF_DB


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"shapes \(2,\) and \(3,\)"):
        tensor_stats(torch.zeros(2), torch.zeros(3))


def test_worst_takes_min_db_and_max_error():
    a = {"psnr_db": 50, "sqnr_db": 45, "cosine": 0.99, "max_abs": 0.1, "mean_abs": 0.01}
    b = {"psnr_db": 40, "sqnr_db": 48, "cosine": 0.999, "max_abs": 0.3, "mean_abs": 0.001}
    w = worst([a, b])
    got = (w["psnr_db"], w["sqnr_db"], w["cosine"], w["max_abs"], w["samples"])
    assert got == (40, 45, 0.99, 0.3, 2)


def test_ssim_of_constant_images_matches_the_closed_form():
    # var = cov = 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b = np.full((16, 16), 100.0), np.full((16, 16), 120.0)
    c1 = (0.01 * 255) ** 2
    assert ssim(a, b) == pytest.approx((2 * 100 * 120 + c1) / (100 ** 2 + 120 ** 2 + c1))


def test_ssim_properties():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3)).astype(np.float64)
    noisy = [np.clip(img + rng.normal(0, s, img.shape), 0, 255) for s in (5, 20, 60)]
    scores = [ssim(img, n) for n in noisy]
    assert ssim(img, img) == pytest.approx(1.0)
    assert scores[0] > scores[1] > scores[2]
    assert ssim(img, noisy[1]) == pytest.approx(ssim(noisy[1], img))


def test_image_stats_on_uint8():
    ref = np.zeros((8, 8, 3), np.uint8)
    out = ref.copy()
    out[0, 0, 0] = 255
    stats = image_stats(ref, out)
    mse = 255 ** 2 / ref.size
    assert stats["psnr_db"] == pytest.approx(10 * math.log10(255 ** 2 / mse))
    assert stats["max_abs"] == 255 and stats["ssim"] < 1
