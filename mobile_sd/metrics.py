"""The one implementation of every numerical metric in mobile-sd (parity, compression,
quantization sensitivity).

Per output tensor: PSNR, SQNR, cosine similarity, max and mean absolute error
(:func:`tensor_stats`); for images: PSNR with an explicit data range and SSIM
(:func:`image_stats`). Everything is computed in float64 on CPU.

PSNR of a tensor uses Apple's definition (``ml-stable-diffusion``'s ``compute_psnr``): the
peak is the largest magnitude of the *reference*, so the 35 dB gate Apple uses and the budgets
of our recipes mean the same thing. SQNR is signal power over noise power.

>>> import torch
>>> ref = torch.linspace(-1, 1, 1000)
>>> stats = tensor_stats(ref, ref + 1e-3)
>>> round(stats["psnr_db"]), round(stats["sqnr_db"]), stats["cosine"] > 0.999
(60, 55, True)
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

INF_DB = 200.0  # identical tensors: a finite number keeps JSON valid and tables sortable


def _as_array(x) -> np.ndarray:
    """A CPU numpy view of a tensor (bfloat16 widened to float32) or array, no float64 copy."""
    if hasattr(x, "detach"):
        import torch

        t = x.detach().to("cpu")
        return (t.float() if t.dtype == torch.bfloat16 else t).contiguous().numpy()
    return np.asarray(x)


def _f64(x) -> np.ndarray:
    """Any tensor/array as a float64 numpy array (torch imported only if given a tensor)."""
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").double().numpy()
    return np.asarray(x, dtype=np.float64)


def ratio_db(signal: float, noise: float, cap: float = INF_DB) -> float:
    """``10 * log10(signal / noise)`` bounded to ``[-cap, cap]``: no noise gives ``cap``, no
    signal ``-cap``. ``cap=math.inf`` for callers that rank or sum (compression)."""
    if noise <= 0.0:
        return cap
    if signal <= 0.0:
        return -cap
    return min(cap, 10.0 * math.log10(signal / noise))


def _energies(reference, test, chunk: int = 1 << 20) -> tuple[float, float, float, int]:
    """(sum ref^2, sum (ref - test)^2, max |ref|, count) in float64, a chunk at a time so a
    GB-sized weight never needs a float64 copy."""
    ref, out = _as_array(reference).ravel(), _as_array(test).ravel()
    _check_shapes(ref, out)
    energy = err = peak = 0.0
    for i in range(0, ref.size, chunk):
        x, y = ref[i:i + chunk].astype(np.float64), out[i:i + chunk].astype(np.float64)
        d = x - y
        energy += float(np.dot(x, x))
        err += float(np.dot(d, d))
        peak = max(peak, float(np.max(np.abs(x), initial=0.0)))
    return energy, err, peak, ref.size


def psnr_db(reference, test, data_range: float | None = None, cap: float = INF_DB) -> float:
    """Peak signal-to-noise ratio in dB.

    ``data_range``: the peak for images (255 for uint8, 2 for [-1, 1]); default: the largest
    magnitude of ``reference`` (Apple's definition for model outputs).
    """
    _, err, peak, n = _energies(reference, test)
    peak = peak if data_range is None else float(data_range)
    return psnr_from_mse(err / max(n, 1), peak, cap)


def psnr_from_mse(mse: float, peak: float, cap: float = INF_DB) -> float:
    """PSNR of a known mean squared error against a known peak."""
    return ratio_db(peak * peak, mse, cap)


def sqnr_db(reference, test, cap: float = INF_DB) -> float:
    """Signal-to-quantization-noise ratio in dB: sum(ref^2) / sum((ref - test)^2)."""
    energy, err, _, _ = _energies(reference, test)
    return ratio_db(energy, err, cap)


def cosine(reference, test) -> float:
    """Cosine similarity of the flattened tensors (1.0 for two zero tensors)."""
    ref, out = _f64(reference).ravel(), _f64(test).ravel()
    _check_shapes(ref, out)
    norm = float(np.linalg.norm(ref) * np.linalg.norm(out))
    if norm == 0.0:
        return 1.0 if not ref.any() and not out.any() else 0.0
    return float(np.dot(ref, out) / norm)


def tensor_stats(reference, test) -> dict[str, float]:
    """All per-output statistics of ``test`` against ``reference`` (same shape)."""
    ref, out = _f64(reference), _f64(test)
    _check_shapes(ref, out)
    if not np.isfinite(out).all():
        bad = int((~np.isfinite(out)).sum())
        return {"psnr_db": -INF_DB, "sqnr_db": -INF_DB, "cosine": 0.0, "max_abs": math.inf,
                "mean_abs": math.inf, "nonfinite": bad, "numel": int(ref.size)}
    err = np.abs(ref - out)
    return {"psnr_db": psnr_db(ref, out), "sqnr_db": sqnr_db(ref, out), "cosine": cosine(ref, out),
            "max_abs": float(err.max(initial=0.0)), "mean_abs": float(err.mean()) if err.size else 0.0,
            "nonfinite": 0, "numel": int(ref.size)}


def worst(stats: Iterable[dict[str, float]]) -> dict[str, float]:
    """The worst case over several samples: min of PSNR/SQNR/cosine, max of the errors."""
    stats = list(stats)
    if not stats:
        raise ValueError("worst() of no samples")
    return {"psnr_db": min(s["psnr_db"] for s in stats), "sqnr_db": min(s["sqnr_db"] for s in stats),
            "cosine": min(s["cosine"] for s in stats), "max_abs": max(s["max_abs"] for s in stats),
            "mean_abs": max(s["mean_abs"] for s in stats),
            "nonfinite": sum(s.get("nonfinite", 0) for s in stats), "samples": len(stats)}


# ------------------------------------------------------------------------------------ images

def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _filter(img: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Separable 'valid' gaussian filter over the first two axes (H, W[, C])."""
    k = len(window)
    rows = sum(window[i] * img[i:img.shape[0] - k + 1 + i] for i in range(k))
    return sum(window[i] * rows[:, i:rows.shape[1] - k + 1 + i] for i in range(k))


def ssim(reference: np.ndarray, test: np.ndarray, data_range: float = 255.0,
         window: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004: 11x11 gaussian window, sigma 1.5,
    K1=0.01, K2=0.03) of two HxW or HxWxC images, averaged over channels.

    >>> img = np.random.default_rng(0).integers(0, 256, (32, 32, 3))
    >>> ssim(img, img)
    1.0
    """
    ref, out = _f64(reference), _f64(test)
    _check_shapes(ref, out)
    if ref.ndim not in (2, 3):
        raise ValueError(f"ssim expects HxW or HxWxC images, got shape {ref.shape}")
    # Tiny test images: shrink the window to the largest odd size that fits.
    window = min(window, min(ref.shape[:2]))
    window -= 1 - window % 2
    if window < 3:
        raise ValueError(f"ssim needs images of at least 3x3 pixels, got {ref.shape[:2]}")
    w = _gaussian_window(window, sigma)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = _filter(ref, w), _filter(out, w)
    var_x = _filter(ref * ref, w) - mu_x ** 2
    var_y = _filter(out * out, w) - mu_y ** 2
    cov = _filter(ref * out, w) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)
    return float(np.mean(num / den))


def image_stats(reference: np.ndarray, test: np.ndarray, data_range: float = 255.0) -> dict:
    """PSNR (with ``data_range``), SSIM and max/mean abs error of two HxWxC images."""
    ref, out = _f64(reference), _f64(test)
    err = np.abs(ref - out)
    return {"psnr_db": psnr_db(ref, out, data_range=data_range),
            "ssim": ssim(ref, out, data_range=data_range),
            "max_abs": float(err.max(initial=0.0)), "mean_abs": float(err.mean())}


def _check_shapes(ref: np.ndarray, out: np.ndarray) -> None:
    if ref.shape != out.shape:
        raise ValueError(f"cannot compare tensors of shapes {tuple(ref.shape)} and "
                         f"{tuple(out.shape)}")


__all__: Sequence[str] = ("psnr_db", "psnr_from_mse", "ratio_db", "sqnr_db", "cosine", "tensor_stats", "worst", "ssim",
                          "image_stats", "INF_DB")
