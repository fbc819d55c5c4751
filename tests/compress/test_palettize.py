"""Palettization: k-means optimality, edge cases, the tensor/module APIs and Core ML packages.

SNRs are compared relatively (ours vs coremltools, grouped vs per-tensor, ours vs an exact
solver) rather than against absolute thresholds. Core ML models are only converted, saved and
inspected (``predict`` needs macOS).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mobile_sd.compress import (CompressionConfig, PalettizeSpec, QuantizeSpec, kmeans_1d,
                                palettize_module, palettize_tensor, weight_snr_db)
from mobile_sd.config import from_dict
from mobile_sd.errors import InvalidArgumentError, RecipeError

# ----------------------------------------------------------------------------- references


def exact_kmeans_sse(values: np.ndarray, k: int) -> float:
    """Optimal 1-D k-means SSE by dynamic programming over sorted distinct values, O(k n^2)."""
    uniq, counts = np.unique(values.astype(np.float64), return_counts=True)
    n = uniq.size
    if n <= k:
        return 0.0
    cn = np.concatenate([[0], np.cumsum(counts)])
    cs = np.concatenate([[0], np.cumsum(uniq * counts)])
    cq = np.concatenate([[0], np.cumsum(uniq * uniq * counts)])
    i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    with np.errstate(divide="ignore", invalid="ignore"):
        num = cs[j] - cs[i]
        cost = np.where(j > i, (cq[j] - cq[i]) - num * num / (cn[j] - cn[i]), np.inf)
    best = cost[0].copy()  # one cluster covering values [0, j)
    for _ in range(k - 1):
        best = np.min(best[:, None] + cost, axis=0)
    return float(best[n])


def lloyd_restarts_sse(values: np.ndarray, k: int, restarts: int = 20, iters: int = 200,
                       seed: int = 0) -> float:
    """Best SSE of plain Lloyd from random data points, many restarts (a strong baseline)."""
    rng = np.random.default_rng(seed)
    x = np.sort(values.astype(np.float64))
    best = np.inf
    for _ in range(restarts):
        c = np.sort(rng.choice(x, k, replace=False))
        for _ in range(iters):
            idx = np.searchsorted((c[1:] + c[:-1]) / 2, x)
            sums = np.bincount(idx, weights=x, minlength=k)
            cnt = np.bincount(idx, minlength=k)
            c = np.sort(np.where(cnt > 0, sums / np.maximum(cnt, 1), c))
        idx = np.searchsorted((c[1:] + c[:-1]) / 2, x)
        best = min(best, float(((x - c[idx]) ** 2).sum()))
    return best


def fp16_grid_values(n: int, seed: int, heavy: bool = False) -> np.ndarray:
    """Random values exactly representable in fp16 (so no two fall into one histogram bin)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3, n) if heavy else rng.standard_normal(n)
    return (x * 0.05).astype(np.float16).astype(np.float32)


# ----------------------------------------------------------------------------- k-means


@pytest.mark.parametrize("k", [2, 3, 4, 8])
@pytest.mark.parametrize("seed,heavy", [(0, False), (1, True), (2, False)])
def test_kmeans_is_optimal_on_small_inputs(k, seed, heavy):
    x = fp16_grid_values(300, seed, heavy)
    res = kmeans_1d(x, k)
    assert res.sse[0] == pytest.approx(exact_kmeans_sse(x, k), rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("heavy", [False, True])
def test_kmeans_beats_many_lloyd_restarts(heavy):
    x = fp16_grid_values(5000, 3, heavy)
    res = kmeans_1d(x, 16)
    assert res.sse[0] <= lloyd_restarts_sse(x, 16) * (1 + 1e-6)


def test_kmeans_rows_are_independent_and_sse_is_exact():
    rng = np.random.default_rng(4)
    rows = (rng.standard_normal((5, 4000)) * np.array([[1], [2], [0.1], [5], [1]])).astype(
        np.float32)
    batched = kmeans_1d(rows, 8)
    for r in range(rows.shape[0]):
        single = kmeans_1d(rows[r], 8)
        np.testing.assert_allclose(batched.lut[r], single.lut[0])
        approx = batched.lut[r][batched.indices[r]]
        true_sse = ((rows[r].astype(np.float64) - approx) ** 2).sum()
        assert batched.sse[r] == pytest.approx(true_sse, rel=1e-6)


# ----------------------------------------------------------------------------- tensor API


@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_palettize_tensor_all_nbits_and_dtypes(nbits, dtype):
    w = (np.random.default_rng(nbits).standard_normal((64, 32, 3, 3)) * 0.02).astype(dtype)
    p = palettize_tensor(w, nbits)
    assert p.lut.shape == (1, 1 << nbits) and p.lut.dtype == dtype
    assert p.indices.shape == w.shape and p.indices.dtype == np.uint8
    assert int(p.indices.max()) < 1 << nbits
    deq = p.dequantized()
    assert deq.dtype == dtype and deq.shape == w.shape
    assert p.snr_db == pytest.approx(weight_snr_db(w, deq), abs=1e-4)
    # Distinct values counted by a Python set: on one CI machine np.unique of float16 (numpy's
    # float16 sort, which has CPU-specific AVX-512 kernels) returned unsorted duplicates.
    assert len(set(deq.ravel().tolist())) <= 1 << nbits


def test_more_bits_give_higher_snr():
    w = np.random.default_rng(0).laplace(size=(128, 256)).astype(np.float32)
    snrs = [palettize_tensor(w, b).snr_db for b in (1, 2, 3, 4, 6, 8)]
    assert snrs == sorted(snrs)


@pytest.mark.parametrize("w", [
    np.full((64, 64), 0.25, np.float32),
    np.zeros((64, 64), np.float32),
    np.full((64, 64), -3.0, np.float16),
    np.random.default_rng(0).choice([0.1, -0.2, 0.3, 1e-3], (64, 64)).astype(np.float32),
    np.random.default_rng(1).choice([0.1, 0.1000001, -0.2], (64, 64)).astype(np.float32),
], ids=["constant", "zeros", "constant-fp16", "4-values", "near-equal-values"])
def test_few_distinct_values_are_exact(w):
    p = palettize_tensor(w, 2)
    np.testing.assert_array_equal(p.dequantized(), w)
    assert p.snr_db == float("inf")


def test_torch_inputs_including_bfloat16():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w = torch.randn(64, 64, dtype=dtype)
        p = palettize_tensor(w, 4)
        ref = w.float().numpy() if dtype == torch.bfloat16 else w.numpy()
        assert p.snr_db == pytest.approx(weight_snr_db(ref, p.dequantized()), abs=1e-4)


def test_grouped_channel_beats_per_tensor():
    rng = np.random.default_rng(0)
    # Real conv weights have per-channel scales; grouped LUTs adapt to them.
    w = (rng.standard_normal((64, 32, 3, 3)) * rng.uniform(0.2, 2.0, (64, 1, 1, 1))).astype(
        np.float32)
    per_tensor = palettize_tensor(w, 4)
    grouped = palettize_tensor(w, 4, "per_grouped_channel", group_size=16)
    assert grouped.lut.shape == (4, 16) and grouped.coreml_lut().shape == (4, 1, 1, 1, 16, 1)
    assert grouped.snr_db > per_tensor.snr_db
    assert grouped.snr_db == pytest.approx(weight_snr_db(w, grouped.dequantized()), abs=1e-4)
    # channel_axis=1 (conv_transpose layout) groups along the second axis
    t = palettize_tensor(np.ascontiguousarray(w.transpose(1, 0, 2, 3)), 4,
                         "per_grouped_channel", 16, channel_axis=1)
    np.testing.assert_array_equal(t.dequantized().transpose(1, 0, 2, 3), grouped.dequantized())


def test_uniform_mode_matches_coremltools_formula():
    w = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
    p = palettize_tensor(w, 3, mode="uniform")
    np.testing.assert_allclose(p.lut[0], np.linspace(w.min(), w.max(), 8), atol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    (dict(nbits=5), "nbits must be one of 1, 2, 3, 4, 6, 8"),
    (dict(nbits=4, granularity="per_grouped_channel", group_size=5), "must divide the 64"),
    (dict(nbits=4, granularity="per_channel"), "granularity must be"),
    (dict(nbits=4, mode="kmeans++"), "mode must be"),
])
def test_tensor_argument_errors(kwargs, message):
    w = np.ones((64, 8), np.float32)
    with pytest.raises(InvalidArgumentError, match=message):
        palettize_tensor(w, **kwargs)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_non_finite_weights_are_rejected(bad, dtype):
    w = np.random.default_rng(0).standard_normal(5000).astype(dtype)
    w[123] = bad
    with pytest.raises(InvalidArgumentError, match="NaN or Inf"):
        palettize_tensor(w, 4)


# ----------------------------------------------------------------------------- config


def test_config_levels_and_yaml_loading():
    cfg = CompressionConfig.from_dict({
        "global_": {"nbits": 6},
        "op_type": {"linear": {"dtype": "int8"}, "conv_transpose": None},
        "op_name": {"conv_in": {"nbits": 4, "granularity": "per_grouped_channel"}}})
    assert cfg.resolve("anything", "conv") == PalettizeSpec(6)
    assert cfg.resolve("proj", "linear") == QuantizeSpec("int8")
    assert cfg.resolve("up", "conv_transpose") is None
    assert cfg.resolve("conv_in", "conv").needs_ios18
    same = from_dict(CompressionConfig, {"global_": {"nbits": 6}}, error=RecipeError)
    assert same.global_ == PalettizeSpec(6)


@pytest.mark.parametrize("data,message", [
    ({"global_": {"nbits": 5}}, r"global_\.nbits: invalid value 5; valid values: 1, 2, 3, 4, 6, 8"),
    ({"global_": {"nbits": 4, "groups": 2}}, "unknown key 'groups'; valid keys: nbits"),
    ({"op_type": {"conv": {"dtype": "int3"}}}, "op_type.conv.dtype: invalid value 'int3'"),
    ({"op_name": {"x": {"bits": 4}}}, "'nbits'.*'dtype'"),
    ({"global": {"nbits": 4}}, "unknown key 'global'; valid keys: global_"),
])
def test_config_errors_name_the_key(data, message):
    with pytest.raises(RecipeError, match=message):
        CompressionConfig.from_dict(data)


def test_spec_validation_raises_recipe_error():
    with pytest.raises(RecipeError, match="nbits: invalid value 5"):
        PalettizeSpec(5)
    with pytest.raises(RecipeError, match="group_size must be a positive integer"):
        PalettizeSpec(4, "per_grouped_channel", group_size=0)


# ----------------------------------------------------------------------------- module API


class TinyNet(torch.nn.Module):
    """Conv/linear layers with >= 2048-element weights, plus small ones left alone."""

    def __init__(self):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(16, 64, 3, padding=1)
        self.conv = torch.nn.Conv2d(64, 64, 3, padding=1)
        self.proj = torch.nn.Linear(64, 128)
        self.conv_out = torch.nn.Conv2d(64, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = torch.relu(self.conv(torch.relu(self.conv_in(x))))
        z = self.proj(y.mean((2, 3))).mean()
        return self.head(self.conv_out(y).mean((2, 3))) + z


def test_palettize_module_report_and_weights():
    torch.manual_seed(0)
    net = TinyNet().eval()
    cfg = CompressionConfig(global_=PalettizeSpec(4, "per_grouped_channel", 16),
                            op_name={"proj": PalettizeSpec(2), "conv": None})
    res = palettize_module(net, cfg)
    rows = {r.name: r for r in res.report}
    assert rows["conv_in.weight"].nbits == 4 and rows["proj.weight"].nbits == 2
    assert rows["conv.weight"].skipped == "config is None for this op"
    assert "not divisible by group_size 16" in rows["conv_out.weight"].skipped
    assert "weight_threshold" in rows["head.weight"].skipped
    assert sorted(res.weights) == ["conv_in.weight", "proj.weight"]
    assert torch.unique(res.weights["proj.weight"]).numel() <= 4
    json.dumps(res.to_json())
    before = net.conv_in.weight.detach().clone()
    res.apply_to(net)
    assert not torch.equal(before, net.conv_in.weight)


def test_palettize_module_unknown_name():
    with pytest.raises(RecipeError, match="no conv/linear module named 'conv_inn'.*conv_in"):
        palettize_module(TinyNet(), CompressionConfig(op_name={"conv_inn": PalettizeSpec(4)}))


# ----------------------------------------------------------------------------- Core ML


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    return TinyNet().eval()


def _convert(net, target: str):
    ct = pytest.importorskip("coremltools")
    args = (torch.randn(1, 16, 8, 8),)
    ep = torch.export.export(net, args).run_decompositions({})
    return ct.convert(ep, convert_to="mlprogram",
                      minimum_deployment_target=getattr(ct.target, target))


@pytest.fixture(scope="module")
def ml_ios17(tiny_net):
    return _convert(tiny_net, "iOS17")


@pytest.fixture(scope="module")
def ml_ios18(tiny_net):
    return _convert(tiny_net, "iOS18")


def _saved_lut_ops(mlmodel, tmp_path):
    from mobile_sd.compress.coreml_apply import lut_ops_in_package

    path = tmp_path / "model.mlpackage"
    mlmodel.save(str(path))
    return {op["name"].removesuffix("_palettized"): op for op in lut_ops_in_package(path)}


def _snrs(tiny_net, mlmodel) -> dict[str, float]:
    from mobile_sd.compress.coreml_apply import coreml_const_name, dense_weights

    dense = dense_weights(mlmodel)
    return {name: weight_snr_db(p.detach().numpy(), dense[coreml_const_name(name)])
            for name, p in tiny_net.named_parameters() if p.numel() > 2048}


@pytest.mark.parametrize("nbits", [4, 6])
def test_ours_beats_coremltools_kmeans(tiny_net, ml_ios17, nbits):
    import coremltools.optimize.coreml as cto

    from mobile_sd.compress.coreml_apply import compress_mlmodel

    theirs = cto.palettize_weights(ml_ios17, cto.OptimizationConfig(
        global_config=cto.OpPalettizerConfig(mode="kmeans", nbits=nbits)))
    ours = compress_mlmodel(ml_ios17, PalettizeSpec(nbits))
    snr_theirs, snr_ours = _snrs(tiny_net, theirs), _snrs(tiny_net, ours)
    for name in snr_theirs:
        assert snr_ours[name] >= snr_theirs[name] - 1e-3, (name, snr_ours, snr_theirs)
    assert np.mean(list(snr_ours.values())) > np.mean(list(snr_theirs.values()))


def test_package_has_lut_ops_with_right_nbits(tiny_net, ml_ios17, ml_ios18, tmp_path):
    from mobile_sd.compress.coreml_apply import compress_mlmodel

    cfg = CompressionConfig(global_=PalettizeSpec(6),
                            op_name={"p_proj_weight_to_fp16": PalettizeSpec(2),
                                     "p_conv_weight_to_fp16": None})
    ops = _saved_lut_ops(compress_mlmodel(ml_ios17, cfg), tmp_path / "17")
    assert {name: op["nbits"] for name, op in ops.items()} == {
        "p_conv_in_weight_to_fp16": 6, "p_conv_out_weight_to_fp16": 6,
        "p_proj_weight_to_fp16": 2}

    grouped = CompressionConfig(global_=PalettizeSpec(4, "per_grouped_channel", 16),
                                op_type={"linear": PalettizeSpec(3)})
    ops = _saved_lut_ops(compress_mlmodel(ml_ios18, grouped), tmp_path / "18")
    assert ops["p_conv_in_weight_to_fp16"]["nbits"] == 4
    assert ops["p_conv_in_weight_to_fp16"]["lut_shape"] == [4, 1, 1, 1, 16, 1]
    assert ops["p_proj_weight_to_fp16"]["nbits"] == 3
    assert "p_conv_out_weight_to_fp16" not in ops  # 4 channels: not divisible by 16


def test_grouped_beats_per_tensor_in_coreml(tiny_net, ml_ios18):
    from mobile_sd.compress.coreml_apply import compress_mlmodel

    per_tensor = _snrs(tiny_net, compress_mlmodel(ml_ios18, PalettizeSpec(4)))
    grouped = _snrs(tiny_net, compress_mlmodel(
        ml_ios18, PalettizeSpec(4, "per_grouped_channel", 16)))
    assert grouped["conv.weight"] > per_tensor["conv.weight"]


def test_ios18_options_on_ios17_raise(ml_ios17):
    from mobile_sd.compress.coreml_apply import compress_mlmodel

    with pytest.raises(RecipeError, match=r"global_: palettization granularity "
                       r"'per_grouped_channel' needs minimum_deployment_target iOS18, but the "
                       r"model targets iOS17"):
        compress_mlmodel(ml_ios17, PalettizeSpec(4, "per_grouped_channel"))
    with pytest.raises(RecipeError, match=r"op_type\['linear'\]: quantization dtype 'int4' "
                       r"needs minimum_deployment_target iOS18"):
        compress_mlmodel(ml_ios17, CompressionConfig(op_type={"linear": QuantizeSpec("int4")}))
    with pytest.raises(RecipeError, match=r"op_name\['p_proj_weight_to_fp16'\]: palettization "
                       r"nbits 3 needs minimum_deployment_target iOS18.*use nbits 2 or 4"):
        compress_mlmodel(ml_ios17, CompressionConfig(
            op_name={"p_proj_weight_to_fp16": PalettizeSpec(3)}))


def test_unknown_op_name_lists_valid_names(ml_ios17):
    from mobile_sd.compress.coreml_apply import compress_mlmodel

    cfg = CompressionConfig(global_=PalettizeSpec(4),
                            op_name={"p_conv_inn_weight_to_fp16": None})
    with pytest.raises(RecipeError, match="no weight const or op named "
                       "'p_conv_inn_weight_to_fp16'.*valid names include: "
                       "p_conv_in_weight_to_fp16"):
        compress_mlmodel(ml_ios17, cfg)


def test_linear_quantization_delegates_to_coremltools(tiny_net, ml_ios18, tmp_path):
    from mobile_sd.compress.coreml_apply import compress_mlmodel

    cfg = CompressionConfig(global_=QuantizeSpec("int4", "per_block", block_size=16),
                            op_type={"linear": QuantizeSpec("int8")},
                            op_name={"p_conv_weight_to_fp16": PalettizeSpec(6)})
    out = compress_mlmodel(ml_ios18, cfg)
    path = tmp_path / "q.mlpackage"
    out.save(str(path))
    ops = out.get_spec().mlProgram.functions["main"].block_specializations["CoreML8"].operations
    types = [op.type for op in ops]
    assert types.count("constexpr_blockwise_shift_scale") == 3  # conv_in, conv_out, proj
    assert types.count("constexpr_lut_to_dense") == 1
    snrs = _snrs(tiny_net, out)
    assert snrs["proj.weight"] > snrs["conv_in.weight"]  # int8 beats int4
