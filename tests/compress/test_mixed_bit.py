"""Mixed-bit palettization: sensitivity, size / PSNR targets, the measured curve and its plot."""
from __future__ import annotations

import json

import pytest
import torch

from mobile_sd.compress import palettize_module
from mobile_sd.compress.mixed_bit import (choose_bits, choose_bits_for_psnr, descent_path,
                                          measure_assignment, measure_sensitivity,
                                          pareto_curve, to_config, total_bytes)
from mobile_sd.compress.mixed_bit_plot import plot_curve
from mobile_sd.errors import InvalidArgumentError

CANDIDATES = (2, 4, 6, 8)


class Net(torch.nn.Module):
    """Conv and linear layers (>= 2048-element weights), one made more sensitive than others."""

    def __init__(self):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(8, 32, 3, padding=1)
        self.conv1 = torch.nn.Conv2d(32, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 64, 3, padding=1)
        self.proj = torch.nn.Linear(64, 256)
        self.out = torch.nn.Linear(256, 64)
        with torch.no_grad():
            self.out.weight.mul_(4.0)

    def forward(self, x):
        y = torch.relu(self.conv_in(x))
        y = torch.relu(self.conv1(y)) + y
        y = torch.relu(self.conv2(y))
        return self.out(torch.nn.functional.gelu(self.proj(y.mean((2, 3)))))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    net = Net().eval()
    inputs = [(torch.randn(2, 8, 12, 12),) for _ in range(2)]
    threads = torch.get_num_threads()
    sens = measure_sensitivity(net, inputs, candidates=CANDIDATES, threads=1)
    assert torch.get_num_threads() == threads  # scoped, restored
    return net, inputs, sens


def test_sensitivity_rises_with_bits_and_weights_are_restored(setup):
    net, inputs, sens = setup
    assert [s.name for s in sens] == ["conv_in", "conv1", "conv2", "proj", "out"]
    for s in sens:
        assert [s.psnr_db[b] for b in CANDIDATES] == sorted(s.psnr_db[b] for b in CANDIDATES)
        assert [s.size_bytes[b] for b in CANDIDATES] == sorted(s.size_bytes.values())
    torch.manual_seed(0)
    fresh = Net().eval()
    for (name, a), (_, b) in zip(net.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), name


def test_max_tensors_keeps_the_largest(setup):
    net, inputs, _ = setup
    sens = measure_sensitivity(net, inputs, candidates=(4, 8), max_tensors=3)
    assert [s.name for s in sens] == ["conv2", "proj", "out"]  # 18432, 16384, 16384 elements


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.8])
def test_choose_bits_hits_the_size_target(setup, fraction):
    _, _, sens = setup
    lo = total_bytes(sens, {s.name: 2 for s in sens})
    hi = total_bytes(sens, {s.name: 8 for s in sens})
    target = lo + fraction * (hi - lo)
    bits = choose_bits(sens, target)
    assert total_bytes(sens, bits) <= target
    # greedy one-step moves: at most one step (the largest single saving) below the target
    step = max(s.size_bytes[8] - s.size_bytes[6] for s in sens)
    assert total_bytes(sens, bits) >= target - step
    with pytest.raises(InvalidArgumentError, match="below the smallest reachable size"):
        choose_bits(sens, lo - 1)


def test_descent_path_shrinks_monotonically(setup):
    _, _, sens = setup
    sizes = [total_bytes(sens, b) for b in descent_path(sens)]
    assert sizes == sorted(sizes, reverse=True)
    assert len(sizes) == 1 + len(sens) * (len(CANDIDATES) - 1)


def test_curve_is_measured_and_monotone(setup, tmp_path):
    net, inputs, sens = setup
    res = pareto_curve(net, inputs, sens, points=6)
    sizes = [p.size_bytes for p in res.curve]
    psnrs = [p.psnr_db for p in res.curve]
    assert sizes == sorted(sizes) and len(res.curve) >= 4
    # monotone-ish: never more than 1 dB below the previous (smaller) point
    assert all(b >= a - 1.0 for a, b in zip(psnrs, psnrs[1:]))
    assert psnrs[-1] > psnrs[0] + 20
    # each point is a real measurement of its assignment, not the predicted sum
    point = res.curve[2]
    assert point.psnr_db == pytest.approx(measure_assignment(net, inputs, point.bits))
    assert [p.label for p in res.uniform] == [f"uniform {b}-bit" for b in CANDIDATES]
    data = json.loads(json.dumps(res.to_json()))
    png = plot_curve(data, tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_psnr_target_is_confirmed_by_measurement(setup):
    net, inputs, sens = setup
    bits, psnr = choose_bits_for_psnr(net, inputs, sens, 40.0)
    assert psnr >= 40.0
    assert psnr == pytest.approx(measure_assignment(net, inputs, bits))
    uniform8 = total_bytes(sens, {s.name: 8 for s in sens})
    assert total_bytes(sens, bits) < uniform8
    with pytest.raises(InvalidArgumentError, match="above what the highest"):
        choose_bits_for_psnr(net, inputs, sens, 500.0)


def test_assignment_becomes_a_config(setup):
    net, _, sens = setup
    bits = choose_bits(sens, total_bytes(sens, {s.name: 4 for s in sens}))
    report = {r.name: r.nbits for r in palettize_module(net, to_config(bits)).report}
    assert report == {f"{name}.weight": b for name, b in bits.items()}
    coreml = to_config(bits, coreml_names=True)
    assert set(coreml.op_name) == {f"p_{name}_weight_to_fp16" for name in bits}
