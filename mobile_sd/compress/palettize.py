"""Palettize one weight tensor: an n-bit look-up table (LUT) per tensor or per channel group.

``palettize_tensor`` returns the LUT and the per-weight indices in the layout Core ML's
``constexpr_lut_to_dense`` uses (iOS18: one LUT per group of ``group_size`` channels along the
output-channel axis), plus the weight SNR. Clustering is :func:`kmeans.kmeans_1d` (near-optimal
1-D k-means, ~15 ns per weight) or ``uniform`` (coremltools' linear LUT between min and max).

>>> import numpy as np
>>> w = np.random.default_rng(0).standard_normal((64, 32, 3, 3)).astype(np.float32)
>>> p = palettize_tensor(w, 4)
>>> p.lut.shape, p.indices.shape, round(p.snr_db, 1)
((1, 16), (64, 32, 3, 3), 20.2)
>>> g = palettize_tensor(w, 4, "per_grouped_channel", group_size=16)
>>> g.lut.shape, g.snr_db > p.snr_db
((4, 16), True)
>>> abs(weight_snr_db(w, g.dequantized()) - g.snr_db) < 1e-3
True
"""
from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Literal

import numpy as np

from mobile_sd.compress.config import VALID_NBITS
from mobile_sd.compress.kmeans import kmeans_1d
from mobile_sd.errors import InvalidArgumentError
from mobile_sd.metrics import ratio_db

Granularity = Literal["per_tensor", "per_grouped_channel"]
Mode = Literal["kmeans", "uniform"]


@dataclass(frozen=True)
class Palettized:
    """A palettized tensor: ``lut[group(c), indices[...]]`` approximates the weight.

    ``lut`` (groups, 2**nbits) in the weight's float dtype; ``indices`` uint8 in the weight's
    shape; groups are consecutive blocks of ``group_size`` along ``channel_axis``
    (per_tensor: one group). ``snr_db`` is exact for the stored (dtype-rounded) LUT.
    """

    lut: np.ndarray
    indices: np.ndarray
    nbits: int
    granularity: str
    group_size: int
    channel_axis: int
    snr_db: float

    def dequantized(self) -> np.ndarray:
        """The approximated weight, same shape and dtype as the original."""
        idx = self._grouped(self.indices)
        rows = np.arange(idx.shape[0])[:, None]
        return self._ungrouped(self.lut[rows, idx])

    def coreml_lut(self) -> np.ndarray:
        """LUT in iOS18 ``constexpr_lut_to_dense`` layout: rank(w)+2 dims, [..., 2**n, 1]."""
        shape = [1] * self.indices.ndim + [self.lut.shape[1], 1]
        shape[self.channel_axis] = self.lut.shape[0]
        return self.lut.reshape(shape)

    def size_bytes(self, lut_bytes_per_entry: int = 2) -> int:
        """Packed size: nbits per index plus an fp16 LUT per group."""
        return -(-self.indices.size * self.nbits // 8) + self.lut.size * lut_bytes_per_entry

    def _grouped(self, a: np.ndarray) -> np.ndarray:
        return np.moveaxis(a, self.channel_axis, 0).reshape(self.lut.shape[0], -1)

    def _ungrouped(self, rows: np.ndarray) -> np.ndarray:
        moved = list(np.moveaxis(self.indices, self.channel_axis, 0).shape)
        return np.moveaxis(rows.reshape(moved), 0, self.channel_axis)


def palettize_tensor(weight, nbits: int, granularity: Granularity = "per_tensor",
                     group_size: int = 16, mode: Mode = "kmeans",
                     channel_axis: int = 0) -> Palettized:
    """Cluster ``weight`` (torch.Tensor or np.ndarray, any float dtype) into 2**nbits values.

    per_grouped_channel: one LUT per ``group_size`` consecutive channels of ``channel_axis``
    (0 for conv/linear weights, 1 for conv_transpose), which must divide that dimension.

    >>> p = palettize_tensor(np.array([[0.0, 1.0], [1.0, 3.0]], np.float32), 2)
    >>> p.lut.tolist(), p.snr_db
    ([[0.0, 1.0, 3.0, 3.0]], inf)
    """
    w = to_numpy(weight)
    _check_args(w, nbits, granularity, group_size, mode, channel_axis)
    axis = channel_axis % w.ndim
    groups = w.shape[axis] // group_size if granularity == "per_grouped_channel" else 1
    rows = np.moveaxis(w, axis, 0).reshape(groups, -1)
    k = 1 << nbits
    if mode == "kmeans":
        lut, indices, snr = _kmeans_rows(rows, k, w.dtype)
    else:
        lut, indices, snr = _uniform_rows(rows, k, w.dtype)
    moved = np.moveaxis(w, axis, 0).shape
    indices = np.moveaxis(indices.reshape(moved), 0, axis)
    return Palettized(lut, indices, nbits, granularity, w.shape[axis] // groups, axis, snr)


def weight_snr_db(original, approx) -> float:
    """10*log10(sum w^2 / sum (w - w')^2), in float64; inf when equal.

    >>> weight_snr_db(np.array([3.0, 4.0]), np.array([3.0, 4.5]))
    20.0
    """
    from mobile_sd.metrics import sqnr_db  # noqa: PLC0415

    a, b = to_numpy(original), to_numpy(approx)
    if a.size != b.size:
        raise InvalidArgumentError(f"weight_snr_db: shapes differ: {a.shape} vs {b.shape}")
    return sqnr_db(a.ravel(), b.ravel(), cap=math.inf)


def to_numpy(weight) -> np.ndarray:
    """A CPU numpy view of a torch tensor (bfloat16 -> float32), or the array itself."""
    if hasattr(weight, "detach"):
        import torch

        t = weight.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.contiguous().numpy()
    return np.asarray(weight)



def _check_args(w, nbits, granularity, group_size, mode, channel_axis) -> None:
    if nbits not in VALID_NBITS:
        raise InvalidArgumentError(f"nbits must be one of {', '.join(map(str, VALID_NBITS))}, "
                                   f"got {nbits!r}")
    if mode not in ("kmeans", "uniform"):
        raise InvalidArgumentError(f"mode must be 'kmeans' or 'uniform', got {mode!r}")
    if w.dtype.kind != "f" or w.size == 0:
        raise InvalidArgumentError(f"palettize_tensor needs a non-empty float tensor, got "
                                   f"dtype {w.dtype} shape {tuple(w.shape)}")
    if granularity == "per_tensor":
        return
    if granularity != "per_grouped_channel":
        raise InvalidArgumentError(f"granularity must be 'per_tensor' or 'per_grouped_channel', "
                                   f"got {granularity!r}")
    if not -w.ndim <= channel_axis < w.ndim:
        raise InvalidArgumentError(f"channel_axis {channel_axis} out of range for shape "
                                   f"{tuple(w.shape)}")
    channels = w.shape[channel_axis]
    if group_size < 1 or channels % group_size:
        raise InvalidArgumentError(
            f"per_grouped_channel: group_size {group_size} must divide the {channels} channels "
            f"of axis {channel_axis} (shape {tuple(w.shape)}); pick a divisor or use per_tensor")


def _lut_dtype(dtype: np.dtype) -> np.dtype:
    return dtype if dtype in (np.float16, np.float32, np.float64) else np.dtype(np.float32)


def _kmeans_rows(rows: np.ndarray, k: int, dtype: np.dtype):
    res = kmeans_1d(rows, k)
    lut = res.lut.astype(_lut_dtype(dtype))
    # Rounding the LUT to its dtype adds sum n_j (c'_j - c_j)^2 to the exact-mean error.
    rounding = (res.counts * (lut.astype(np.float64) - res.lut) ** 2).sum()
    return lut, res.indices, ratio_db(float(res.energy.sum()), float(res.sse.sum() + rounding),
                                      cap=math.inf)


def _uniform_rows(rows: np.ndarray, k: int, dtype: np.dtype):
    """coremltools' uniform LUT: k evenly spaced values from each row's min to its max."""
    x = rows.astype(np.float64)
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    step = (hi - lo) / (k - 1)
    safe = np.where(step > 0, step, 1.0)
    indices = np.clip(np.rint((x - lo) / safe), 0, k - 1).astype(np.uint8)
    lut = (lo + step * np.arange(k)[None]).astype(_lut_dtype(dtype))
    approx = np.take_along_axis(lut.astype(np.float64), indices.astype(np.int64), axis=1)
    return lut, indices, ratio_db(float((x * x).sum()), float(((x - approx) ** 2).sum()),
                                  cap=math.inf)
