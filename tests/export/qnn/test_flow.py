"""``format: qnn`` through the product: recipes, ``mobile-sd export`` (fp16 / w8a16, ``--soc``),
the manifest entry, ``mobile-sd parity`` in the HTP emulator, and the all-or-nothing failures
(a node the HTP rejects; onnxruntime-qnn missing)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from mobile_sd.errors import BackendUnavailableError, RecipeError, UnsupportedOpError
from mobile_sd.recipes import QNN_SOCS, Recipe, load_recipe

RECIPES = Path(__file__).resolve().parents[3] / "export_recipes"
FP16, W8A16 = RECIPES / "android-snapfusion-qnn-fp16.yaml", RECIPES / "android-snapfusion-qnn-w8a16.yaml"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread."""


def test_recipes_load():
    fp16, w8 = load_recipe(FP16), load_recipe(W8A16)
    assert (fp16.format, fp16.backend, fp16.target, fp16.precision) == ("qnn", "htp", "android",
                                                                        "fp16")
    assert w8.precision == "w8a16" and w8.options.soc == "SM8650" and w8.options.opset == 21


def test_unknown_soc_lists_known(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(FP16.read_text().replace("soc: SM8650", "soc: SM8450"))
    with pytest.raises(RecipeError) as exc:
        load_recipe(bad)
    assert "'SM8450'" in str(exc.value) and all(s in str(exc.value) for s in QNN_SOCS)
    with pytest.raises(ValueError, match="int8"):
        Recipe(name="x", format="qnn", backend="htp", target="android", precision="int8")


def test_soc_flag_checked(cli, tmp_path):
    code, _, err = cli("export", "--recipe", FP16, "--spec", "snapfusion-tiny", "--soc", "SM1234",
                       "--out", tmp_path / "out")
    assert code == 2 and "SM1234" in err and "SM8750" in err
    code, _, err = cli("export", "--recipe", RECIPES / "onnx-snapfusion.yaml", "--spec",
                       "snapfusion-tiny", "--soc", "SM8650", "--out", tmp_path / "out")
    assert code == 2 and "--soc applies to format 'qnn'" in err
    assert not (tmp_path / "out").exists()


def test_missing_plugin_exit_2_nothing_written(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)      # import fails
    code, _, err = cli("export", "--recipe", FP16, "--spec", "snapfusion-tiny", "--latent-size",
                       "8", "--components", "decoder", "--out", tmp_path / "out")
    assert code == 2 and "pip install onnxruntime-qnn==2.7.0" in err
    assert list(tmp_path.iterdir()) == []


class _LoneErf(torch.nn.Module):
    def forward(self, z):
        return torch.erf(z * 0.5) + 1.0


def test_fallback_node_fails_naming_it(tmp_path):
    pytest.importorskip("onnxruntime_qnn", reason="onnxruntime-qnn not installed")
    from mobile_sd.export.components import ExportComponent, TensorSpec
    from mobile_sd.export.qnn.flow import export_component

    recipe = load_recipe(FP16)
    comp = ExportComponent("decoder", _LoneErf(), (TensorSpec("z", (1, 4, 8, 8)),),
                           (TensorSpec("image", (1, 4, 8, 8)),))
    with pytest.raises(UnsupportedOpError) as exc:
        export_component(comp, recipe.component("decoder"), recipe, tmp_path, reference=None)
    assert "Erf" in str(exc.value) and "SM8650" in str(exc.value)
    assert list(tmp_path.iterdir()) == []                               # nothing written


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _export_and_check(cli, recipe: Path, out: Path, components: list[str], *extra) -> dict:
    pytest.importorskip("onnxruntime_qnn", reason="onnxruntime-qnn not installed")
    code, stdout, err = cli("export", "--recipe", recipe, "--spec", "snapfusion-tiny",
                            "--latent-size", "8", "--components", *components, "--out", out,
                            *extra)
    assert code == 0, err
    manifest = _manifest(out)
    for name in components:
        comp = manifest["components"][name]
        formats = sorted(f["format"] for f in comp["files"])
        assert formats == ["qnn_bin", "qnn_context"]
        assert all((out / f["path"]).is_file() and f["bytes"] > 0 and len(f["sha256"]) == 64
                   for f in comp["files"])
        assert comp["qairt"] == "2.51.0" and comp["htp"]["fallback"] == []
        assert comp["htp"]["partitions"] == 1 and comp["htp"]["htp_nodes"] > 0
    assert not [p for p in out.iterdir() if p.name.startswith(".")]     # no temp left
    return manifest


def _parity(cli, folder: Path, components: list[str]) -> dict:
    code, stdout, err = cli("parity", folder, "--spec", "snapfusion-tiny", "--quiet", "--no-e2e",
                            "--no-locate", "--random-inputs", "1", "--components", *components,
                            "--out", folder.parent / f"{folder.name}-parity")
    report = json.loads((folder.parent / f"{folder.name}-parity" / "parity.json").read_text())
    return code, stdout + err, report


def test_fp16_export_on_another_soc_and_parity(cli, tmp_path):
    out = tmp_path / "fp16"
    manifest = _export_and_check(cli, FP16, out, ["decoder"], "--soc", "sm8750")
    comp = manifest["components"]["decoder"]
    assert (comp["soc"], comp["soc_model"], comp["htp_arch"]) == ("SM8750", 69, "v79")
    code, text, report = _parity(cli, out, ["decoder"])
    dec = report["components"]["decoder"]
    assert code == 0, text
    assert dec["status"] == "pass" and dec["runtime"] == "qnn-htp"
    assert dec["tiers"]["fp32"]["worst"]["psnr_db"] >= 40


def test_w8a16_export_calibrated_and_parity(cli, tmp_path):
    out = tmp_path / "w8a16"
    manifest = _export_and_check(cli, W8A16, out, ["text_encoder"])
    quant = manifest["components"]["text_encoder"]["quantization"]
    # the recipe's 2 calibration prompts, each encoded with its unconditional prompt: the full
    # recorded run (a reference-only run records 1 prompt -> 2 calls), never random tensors
    assert quant["scheme"] == "w8a16" and quant["calibration_samples"] == 4
    assert quant["masks_clamped"], "CLIP's causal mask should have been clamped"
    code, text, report = _parity(cli, out, ["text_encoder"])
    assert code == 0, text
    assert report["components"]["text_encoder"]["tiers"]["fp32"]["worst"]["psnr_db"] >= 25
