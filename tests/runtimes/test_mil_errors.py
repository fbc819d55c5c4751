"""Bad input to the MIL runtime: one-line MobileSDError messages that name the file / op."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

import coremltools as ct
from coremltools.converters.mil.mil import Builder as mb

from mobile_sd.errors import MobileSDError
from mobile_sd.runtimes.coreml import (MilModel, MilRuntimeError, UnsupportedMilOpError,
                                       run_program)

W = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def linear_package(tmp_path_factory):
    """A small ML Program whose weight lives in weights/weight.bin."""
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 64))], opset_version=ct.target.iOS17)
    def prog(x):
        return mb.relu(x=mb.linear(x=x, weight=W, name="proj"), name="y")

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
                       compute_precision=ct.precision.FLOAT32)
    path = tmp_path_factory.mktemp("pkg") / "Linear.mlpackage"
    model.save(str(path))
    return path


def _one_line(err, *names):
    msg = str(err.value)
    assert "\n" not in msg
    assert isinstance(err.value, MobileSDError)
    for name in names:
        assert str(name) in msg, (name, msg)
    return msg


def test_package_runs(linear_package):
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    out = MilModel(linear_package).predict({"x": x})
    np.testing.assert_allclose(out["y"], np.maximum(x @ W.T, 0), rtol=1e-5, atol=1e-5)


def test_path_that_is_not_a_package(tmp_path):
    with pytest.raises(MilRuntimeError) as err:
        MilModel(tmp_path / "missing.mlpackage")
    _one_line(err, tmp_path / "missing.mlpackage")
    junk = tmp_path / "junk.mlpackage"
    junk.write_text("not a package")
    with pytest.raises(MilRuntimeError) as err:
        MilModel(junk)
    assert "not an .mlpackage" in _one_line(err, junk)
    empty = tmp_path / "empty.mlpackage"
    empty.mkdir()
    with pytest.raises(MilRuntimeError) as err:
        MilModel(empty)
    _one_line(err, empty)


def test_neuralnetwork_package_is_rejected(tmp_path):
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder

    builder = NeuralNetworkBuilder([("x", datatypes.Array(3))], [("y", datatypes.Array(3))])
    builder.add_activation("relu", "RELU", "x", "y")
    path = tmp_path / "Old.mlpackage"
    ct.models.MLModel(builder.spec).save(str(path))
    with pytest.raises(MilRuntimeError) as err:
        MilModel(path)
    assert "not an ML Program" in _one_line(err, path, "neuralNetwork")


def test_missing_weights_folder(linear_package, tmp_path):
    path = tmp_path / "NoWeights.mlpackage"
    shutil.copytree(linear_package, path)
    shutil.rmtree(path / "Data" / "com.apple.CoreML" / "weights")
    with pytest.raises(MilRuntimeError) as err:
        MilModel(path)
    assert "weights folder" in _one_line(err, path)


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_weight_blob(linear_package, tmp_path, keep):
    path = tmp_path / "Cut.mlpackage"
    shutil.copytree(linear_package, path)
    blob = path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    data = blob.read_bytes()
    blob.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(MilRuntimeError) as err:
        MilModel(path)
    assert "truncated" in _one_line(err, path, "weight.bin")


def test_unsupported_op_names_type_op_package_and_recipe(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 5))], opset_version=ct.target.iOS17)
    def prog(x):
        return mb.argsort(x=mb.relu(x=x), axis=-1, name="order")

    with pytest.raises(UnsupportedMilOpError) as err:
        run_program(prog, {"x": np.zeros((2, 5), np.float32)})
    _one_line(err, "argsort", "order")
    path = tmp_path / "Sort.mlpackage"
    ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17).save(str(path))
    with pytest.raises(UnsupportedMilOpError) as err:
        MilModel(path, recipe="ios-test-recipe")
    _one_line(err, "argsort", "order", path, "ios-test-recipe")
    assert err.value.op_type == "argsort"


def test_wrong_inputs(linear_package):
    model = MilModel(linear_package)
    with pytest.raises(MilRuntimeError) as err:
        model.predict({"z": np.zeros((2, 64), np.float32)})
    _one_line(err, "x", linear_package)
    with pytest.raises(MilRuntimeError) as err:
        model.predict({"x": np.zeros((3, 64), np.float32)})
    _one_line(err, "(3, 64)", "(2, 64)")
    with pytest.raises(MilRuntimeError) as err:
        MilModel(linear_package, mode="fp8")
    _one_line(err, "fp8")
