"""coreml_inspect: I/O, op types, compression and structure checks of saved .mlpackages (Linux)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mobile_sd.errors import ExportError, InvalidArgumentError
from mobile_sd.export.coreml.inspect import (assert_structure, check_structure,
                                                compression_ops, describe_io, load_graph,
                                                op_histogram, weight_bytes, weight_file_bytes)

ct = pytest.importorskip("coremltools")


class TinyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, latent):
        return torch.relu(self.conv(latent))


def _convert(module, args, dynamic_shapes=None, **kwargs):
    exported = torch.export.export(module.eval(), args, dynamic_shapes=dynamic_shapes)
    exported = exported.run_decompositions({})
    return ct.convert(exported, convert_to="mlprogram",
                      minimum_deployment_target=ct.target.iOS17, **kwargs)


@pytest.fixture(scope="module")
def conv_model():
    """Named fp16 I/O, as the exporter is meant to write them (auto names are unstable)."""
    return _convert(TinyConv(), (torch.randn(1, 4, 8, 8),),
                    inputs=[ct.TensorType(name="latent", shape=(1, 4, 8, 8), dtype=np.float16)],
                    outputs=[ct.TensorType(name="noise", dtype=np.float16)])


@pytest.fixture(scope="module")
def conv_pkg(conv_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("inspect") / "conv.mlpackage"
    conv_model.save(str(path))
    return path


@pytest.fixture(scope="module")
def lut4_pkg(conv_model, tmp_path_factory):
    from coremltools.optimize import coreml as cto

    config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(
        nbits=4, mode="uniform", weight_threshold=0))
    path = tmp_path_factory.mktemp("inspect") / "conv_lut4.mlpackage"
    cto.palettize_weights(conv_model, config).save(str(path))
    return path


@pytest.fixture(scope="module")
def manifest_io():
    return {"inputs": [{"name": "latent", "shape": [1, 4, 8, 8], "dtype": "float16"}],
            "outputs": [{"name": "noise", "shape": [1, 8, 8, 8], "dtype": "float16"}]}


def test_describe_io_reads_names_shapes_dtypes(conv_pkg, manifest_io):
    io = describe_io(conv_pkg)
    for side in ("inputs", "outputs"):
        assert [{k: e[k] for k in ("name", "shape", "dtype")} for e in io[side]] \
            == manifest_io[side]
    assert io["inputs"][0]["flexible"] is None


def test_describe_io_reports_range_dims():
    class Proj(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(x)

    model = _convert(Proj(), (torch.randn(1, 16, 8),),
                     dynamic_shapes={"x": {1: torch.export.Dim("seq", min=1, max=64)}},
                     inputs=[ct.TensorType(name="x", shape=(1, ct.RangeDim(1, 64), 8))])
    io = describe_io(model)
    assert io["inputs"][0]["flexible"] == {"range": [[1, 1], [1, 64], [8, 8]]}
    assert io["outputs"][0]["shape"] == [1, None, 8]       # from the MIL type: unknown dim


def test_op_histogram_counts_op_types(conv_pkg):
    hist = op_histogram(conv_pkg)
    assert hist["conv"] == 1 and hist["relu"] == 1 and hist["const"] >= 2
    assert "constexpr_lut_to_dense" not in hist


def test_op_histogram_recurses_into_nested_blocks():
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4))], opset_version=ct.target.iOS17)
    def prog(x):
        pred = mb.greater(x=mb.reduce_sum(x=x), y=0.0)
        return mb.cond(pred=pred, _true_fn=lambda: mb.relu(x=x), _false_fn=lambda: mb.sigmoid(x=x))

    hist = op_histogram(ct.convert(prog, convert_to="mlprogram",
                                   minimum_deployment_target=ct.target.iOS17))
    assert hist["cond"] == 1 and hist["relu"] == 1 and hist["sigmoid"] == 1


def test_compression_ops_counts_lut_and_nbits(lut4_pkg, conv_pkg):
    ops = compression_ops(lut4_pkg)
    assert ops["constexpr_lut_to_dense"] == 1 and ops["lut_nbits"] == {4: 1}
    assert ops["constexpr_affine_dequantize"] == 0
    assert compression_ops(conv_pkg)["lut_nbits"] == {}


def test_compression_ops_counts_int8(conv_model):
    from coremltools.optimize import coreml as cto

    config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(weight_threshold=0))
    ops = compression_ops(cto.linear_quantize_weights(conv_model, config))
    assert ops["constexpr_affine_dequantize"] == 1 and ops["constexpr_lut_to_dense"] == 0


def test_weight_bytes_reads_blob_headers(conv_pkg, lut4_pkg):
    dense = weight_bytes(conv_pkg)
    assert dense >= 8 * 4 * 3 * 3 * 2                   # fp16 conv weight
    assert dense <= weight_file_bytes(conv_pkg)         # headers and alignment on disk
    assert weight_bytes(lut4_pkg) < dense               # 4-bit indices + a 16-entry LUT


def test_check_structure_accepts_matching_manifest(lut4_pkg, manifest_io):
    assert check_structure(lut4_pkg, manifest_io, {"palettize": 1, "lut_nbits": 4}) == []


def test_check_structure_catches_renamed_output(conv_pkg, manifest_io):
    renamed = {**manifest_io, "outputs": [{**manifest_io["outputs"][0], "name": "eps"}]}
    problems = check_structure(conv_pkg, renamed)
    assert "output 'eps' is missing (the package has ['noise'])" in problems
    assert "unexpected output 'noise' (the manifest lists ['eps'])" in problems


def test_check_structure_catches_shape_and_dtype(conv_pkg, manifest_io):
    wrong = {"inputs": [{"name": "latent", "shape": [1, 4, 16, 16], "dtype": "float32"}]}
    problems = check_structure(conv_pkg, wrong)
    assert problems == [
        "input 'latent': shape [1, 4, 8, 8] differs from the manifest's [1, 4, 16, 16]",
        "input 'latent': dtype float16 differs from the manifest's float32"]
    assert check_structure(conv_pkg, {"inputs": [{"name": "latent", "shape": [1, 4, None, None]}]}
                           ) == []


def test_check_structure_catches_missing_lut(conv_pkg, lut4_pkg):
    problems = check_structure(conv_pkg, None, {"palettize": 1, "lut_nbits": 4})
    assert problems == [
        "compression 'palettize' is missing: expected at least 1 constexpr_lut_to_dense op(s), "
        "found 0",
        "expected 4-bit LUTs but the package has no constexpr_lut_to_dense op"]
    assert check_structure(lut4_pkg, None, {"lut_nbits": 6}) == [
        "expected every LUT to be 6-bit, found {4: 1} (nbits: count)"]


def test_assert_structure_raises_export_error_listing_problems(conv_pkg, manifest_io):
    assert_structure(conv_pkg, manifest_io)              # matches: no error
    with pytest.raises(ExportError, match=r"(?s)does not match its manifest entry:\n  - "
                                          r"compression 'palettize' is missing.*Re-export it"):
        assert_structure(conv_pkg, manifest_io, {"palettize": 1})


def test_unknown_compression_key_lists_valid_keys(conv_pkg):
    with pytest.raises(InvalidArgumentError, match="unknown key 'kmeans'; valid keys: "
                                                   "linear_quantize, palettize, prune, lut_nbits"):
        check_structure(conv_pkg, None, {"kmeans": 1})


def test_missing_package_raises_export_error(tmp_path):
    with pytest.raises(ExportError, match="no such Core ML model; export it first"):
        describe_io(tmp_path / "nope.mlpackage")


def test_load_graph_indexes_producers_and_types(conv_pkg):
    graph = load_graph(conv_pkg)
    assert graph.outputs == ("noise",)
    assert graph.producers["noise"].type == "relu"
    assert graph.types["noise"].shape == (1, 8, 8, 8) and graph.types["noise"].dtype == "float16"


def test_unsupported_object_says_what_to_pass():
    with pytest.raises(InvalidArgumentError, match="convert a MIL Program first with ct.convert"):
        describe_io(object())
