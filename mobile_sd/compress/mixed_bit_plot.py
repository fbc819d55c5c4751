"""Plot a mixed-bit PSNR-vs-size curve (from :class:`mixed_bit.MixedBitResult` data) to PNG.

>>> from mobile_sd.compress.mixed_bit import CurvePoint, MixedBitResult
>>> res = MixedBitResult([], [CurvePoint("m", 3 << 20, 40.0, 41.0, {})],
...                      [CurvePoint("uniform 4-bit", 2 << 20, 30.0, 30.5, {})], 0)
>>> plot_curve(res.to_json(), "/tmp/curve.png", title="tiny")          # doctest: +ELLIPSIS
PosixPath('/tmp/curve.png')
"""
from __future__ import annotations

from pathlib import Path


def plot_curve(data: dict, path: str | Path, title: str = "Mixed-bit palettization") -> Path:
    """Draw measured PSNR vs size (MiB): the mixed-bit curve, its predictions, uniform bits.

    ``data`` is ``MixedBitResult.to_json()`` (or the same dict read back from JSON).
    """
    from matplotlib.figure import Figure  # no pyplot: the process's backend stays as it is

    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    ax = fig.subplots()
    _draw(ax, data)
    ax.set_xlabel("weights (MiB, LUT + indices + fp16 rest)")
    ax.set_ylabel("output PSNR (dB) vs fp32")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)   # a bare Figure renders with Agg; nothing to close (no pyplot registry)
    return path


def _draw(ax, data: dict) -> None:
    def xy(points, key="psnr_db"):
        pts = sorted((p["size_bytes"] / 2**20, p[key]) for p in points
                     if p.get(key) is not None)
        return [x for x, _ in pts], [_finite(y) for _, y in pts]

    ax.plot(*xy(data["curve"]), "o-", label="mixed-bit (measured)")
    ax.plot(*xy(data["curve"], "predicted_psnr_db"), "x--", alpha=0.6,
            label="mixed-bit (predicted, additive errors)")
    xs, ys = xy(data["uniform"])
    ax.plot(xs, ys, "s:", label="uniform bits (measured)")
    for point, x, y in zip(sorted(data["uniform"], key=lambda p: p["size_bytes"]), xs, ys):
        ax.annotate(point["label"].replace("uniform ", ""), (x, y), textcoords="offset points",
                    xytext=(4, -10), fontsize=8)


def _finite(value: float, cap: float = 200.0) -> float:
    return min(float(value), cap)
