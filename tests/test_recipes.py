"""Recipes: every shipped recipe loads; unknown keys and conflicts are RecipeError by message."""
from __future__ import annotations

import pytest
import yaml

from mobile_sd.errors import RecipeError
from mobile_sd.recipes import load_recipe

from tests.helpers.paths import RECIPES as _RECIPE_DIR  # noqa: E402

RECIPES = sorted(_RECIPE_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipes_load(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert recipe.exported_components()


def test_the_issue_recipes_are_shipped():
    names = {p.stem for p in RECIPES}
    assert {"ios-snapfusion-swift", "ios-snapfusion-fast", "android-snapfusion-xnnpack-fp32",
            "android-snapfusion-xnnpack-int8", "ios-snapfusion-executorch-coreml",
            "android-snapfusion-qnn", "onnx-snapfusion"} <= names


def _load(tmp_path, **data):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "r", **data}))
    return load_recipe(path)


def test_per_component_overrides(tmp_path):
    r = _load(tmp_path, format="executorch", backend="xnnpack", target="android",
              precision="int8", components={"text_encoder": {"precision": "int8_dynamic"},
                                            "decoder": {"export": False}})
    assert r.component("text_encoder").precision == "int8_dynamic"
    assert r.component("unet").precision == "int8"
    assert r.exported_components() == ["text_encoder", "unet"]


@pytest.mark.parametrize("data,message", [
    ({"format": "executorch", "backend": "xnnpack", "target": "android", "colour": 1},
     "unknown key 'colour'; valid keys: attention, backend, bundled_io, calibration"),
    ({"format": "executorch", "backend": "xnnpack", "target": "android", "components": {"vae": {}}},
     "unknown component 'vae'; valid components: text_encoder, unet, decoder"),
    ({"format": "executorch", "backend": "tflite", "target": "android"},
     "backend: invalid value 'tflite'; valid values: 'coreml', 'xnnpack', 'qnn', 'onnxruntime'"),
    ({"format": "onnx", "backend": "onnxruntime", "target": "host", "precision": "int8"},
     "precision 'int8' (text_encoder) is not supported by onnx/onnxruntime; valid: fp16, fp32"),
    ({"format": "executorch", "backend": "qnn", "target": "android", "precision": "int4_weight"},
     "is not supported by executorch/qnn"),
    ({"format": "coreml", "backend": "coreml", "target": "iOS17", "interface": "swift", "cfg": "folded"},
     "interface 'swift' (Apple's StableDiffusion Swift package) needs format 'coreml' and cfg 'batch2'"),
    ({"format": "executorch", "backend": "xnnpack", "target": "iOS17"},
     "target 'iOS17' needs backend 'coreml'"),
    ({"format": "executorch", "backend": "xnnpack", "target": "android", "weights": "separate",
      "unet_chunk_max_bytes": 1000},
     "'unet_chunk_max_bytes' is an option of format 'coreml', not of format 'executorch'; "
     "valid keys for 'executorch': attention"),
    ({"format": "onnx", "backend": "onnxruntime", "target": "host", "weights": "separate"},
     "'weights' is an option of format 'executorch', not of format 'onnx'"),
    ({"format": "executorch", "backend": "xnnpack", "target": "android", "latent_size": 30},
     "latent_size must be a positive multiple of 8"),
    ({"format": "executorch", "backend": "xnnpack", "target": "android",
      "components": {n: {"export": False} for n in ("text_encoder", "unet", "decoder")}},
     "nothing to export"),
])
def test_bad_recipes(tmp_path, data, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace(".", r"\.").replace("'", "'")):
        _load(tmp_path, **data)


def test_missing_recipe_file_lists_shipped_ones(tmp_path):
    with pytest.raises(RecipeError, match=r"no such recipe file; shipped recipes: .*onnx-snapfusion.yaml"):
        load_recipe(tmp_path / "nope.yaml")
