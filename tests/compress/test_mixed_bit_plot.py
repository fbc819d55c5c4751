"""The mixed-bit plot draws on its own Figure: it must not switch the process's backend."""
from __future__ import annotations

import matplotlib
import pytest

from mobile_sd.compress.mixed_bit_plot import plot_curve

DATA = {"curve": [{"label": "m", "size_bytes": 3 << 20, "psnr_db": 40.0,
                   "predicted_psnr_db": 41.0}],
        "uniform": [{"label": "uniform 4-bit", "size_bytes": 2 << 20, "psnr_db": 30.0,
                     "predicted_psnr_db": 30.5}]}


@pytest.fixture
def svg_backend():
    """A non-Agg backend chosen by 'the user' (svg: needs no display), restored afterwards."""
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    yield
    matplotlib.use(before)


def test_plot_keeps_the_global_backend(svg_backend, tmp_path):
    png = plot_curve(DATA, tmp_path / "curve.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert matplotlib.get_backend().lower() == "svg"
