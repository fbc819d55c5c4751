"""`mobile-sd export` then `mobile-sd parity` on the micro spec, with the shipped recipes."""
from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers import parity_exports as pe

from tests.helpers.paths import RECIPES  # noqa: E402
# Lowering the decoder to XNNPACK takes ~40 s even at micro size: the ONNX export covers it.
COMPONENTS = {"onnx-snapfusion.yaml": ("text_encoder", "unet", "decoder"),
              "android-snapfusion-xnnpack-fp32.yaml": ("text_encoder", "unet")}



@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export folders written by `mobile-sd export`, keyed by recipe file name."""
    from mobile_sd.commands.cli import main

    root, done = tmp_path_factory.mktemp("flow"), {}

    def get(recipe: str):
        if recipe not in done:
            out = root / recipe.replace(".yaml", "")
            code = main(["export", "--recipe", str(RECIPES / recipe), "--spec", pe.MICRO,
                         "--latent-size", "8", "--out", str(out),
                         "--components", *COMPONENTS[recipe]])
            assert code == 0, f"mobile-sd export --recipe {recipe} failed"
            done[recipe] = out
        return done[recipe]
    return get


def parity(cli, folder, out):
    return cli("parity", folder, "--spec", pe.MICRO, "--prompts", "a cat", "--out", out,
               "--threads", "1", "--quiet")


@pytest.mark.parametrize("recipe", ["onnx-snapfusion.yaml", "android-snapfusion-xnnpack-fp32.yaml"])
def test_exported_folder_passes(cli, exported, tmp_path, recipe):
    code, out, err = parity(cli, exported(recipe), tmp_path)
    assert code == 0, out + err
    report = json.loads((tmp_path / "parity.json").read_text())
    assert report["summary"]["failed"] == 0 and report["summary"]["skipped"] == 0
    eager = [c for c in ("text_encoder", "unet", "decoder") if c not in COMPONENTS[recipe]]
    assert report["e2e"]["eager_components"] == eager     # the rest ran on its runtime


def test_edited_initializer_in_a_simplified_onnx_export(cli, exported, tmp_path):
    """An edited initializer in a simplified export (name scopes restored after onnxsim) is
    named down to the layer."""
    folder = tmp_path / "edited"
    shutil.copytree(exported("onnx-snapfusion.yaml"), folder)
    pe.edit_onnx_initializer(folder / "unet/model.onnx", "up_blocks.0.resnets.0.conv1.bias")
    pe.rehash_in_manifest(folder, "unet", "unet/model.onnx")

    code, out, _ = parity(cli, folder, tmp_path / "report")
    assert code == 1
    assert "first divergence: `up_blocks.0.resnets.0.conv1`" in out
