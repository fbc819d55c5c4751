"""A perturbed export fails its gate, and the locator names the layer that was changed."""
from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import torch

from tests.helpers import parity_exports as pe



def parity(cli, folder, out):
    return cli("parity", folder, "--spec", pe.MICRO, "--prompts", "a cat", "--out", out,
               "--threads", "1", "--quiet")


def _locator(out, name):
    report = json.loads((out / "parity.json").read_text())
    return report["components"][name]["locator"]


def test_onnx_export_of_a_perturbed_weight_fails_and_names_the_layer(exports, cli, tmp_path):
    weight = "down_blocks.0.resnets.0.conv2.weight"
    folder = exports.export_folder("onnx", ("unet",), ("unet", weight, 0.5))
    code, out, err = parity(cli, folder, tmp_path)
    assert code == 1, out + err
    assert "FAIL  unet" in out and "first divergence: `down_blocks.0.resnets.0.conv2`" in out
    loc = _locator(tmp_path, "unet")
    assert (loc["status"], loc["module"], loc["class"]) == \
        ("found", "down_blocks.0.resnets.0.conv2", "Conv2d")
    assert loc["psnr_db"] < loc["gate_min_psnr_db"]
    assert loc["weights_differ"][0]["name"] == weight


def test_onnx_initializer_edited_in_the_file(exports, cli, tmp_path):
    """Edit one initializer of a correct artifact; the sha256 check catches it first, and with
    the manifest's hash updated the locator finds the layer from activations alone."""
    folder = exports.copy_folder(exports.export_folder("onnx", ("text_encoder", "unet", "decoder")), "edited")
    pe.edit_onnx_initializer(folder / "unet.onnx",
                             "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.bias")
    code, _, err = parity(cli, folder, tmp_path / "first")
    assert code == 2 and "unet.onnx: sha256" in err

    pe.rehash_in_manifest(folder, "unet", "unet.onnx")
    code, out, _ = parity(cli, folder, tmp_path / "second")
    assert code == 1
    loc = _locator(tmp_path / "second", "unet")
    assert loc["module"] == "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
    assert loc["trail"][0]["module"] == "up_blocks.0"    # the search went down the tree


def test_executorch_export_of_a_perturbed_weight_names_the_layer(exports, cli, tmp_path):
    weight = "clip.encoder.layers.0.mlp.fc1.weight"
    folder = exports.export_folder("executorch", ("text_encoder",), ("text_encoder", weight, 0.5))
    code, out, _ = parity(cli, folder, tmp_path)
    assert code == 1
    assert "first divergence: `clip.encoder.layers.0.mlp.fc1`" in out
    loc = _locator(tmp_path, "text_encoder")
    assert loc["class"] == "Linear" and loc["event"] == "DELEGATE_CALL"
    assert "clip.encoder.layers.0.mlp.fc1" in loc["covers"]
    assert loc["weights_differ"][0]["name"] == weight


def test_graph_only_etrecord_says_what_the_locator_could_not_compare(exports, cli, tmp_path):
    weight = "clip.encoder.layers.0.mlp.fc1.weight"
    folder = exports.export_folder("executorch", ("text_encoder",), ("text_encoder", weight, 0.5),
                              etrecord="graph")
    code, _, _ = parity(cli, folder, tmp_path)
    assert code == 1                                   # the departure is still detected
    loc = _locator(tmp_path, "text_encoder")
    assert loc["weights_differ"] == [] and "graph-only ETRecord" in loc["etrecord_note"]


def test_descend_enters_the_first_departing_child():
    from mobile_sd.parity.locate_tree import descend

    calls = OrderedDict((p, ("M", (4,))) for p in ["a.x", "a", "b.y.z", "b.y", "b.w", "b", "c"])
    reference = lambda paths: {p: torch.ones(4) for p in paths}  # noqa: E731
    bad = {"b.y.z", "b.y", "b", "c"}               # c departs too, but after b
    values = lambda paths: {p: np.ones(4) * (2.0 if p in bad else 1.0) for p in paths}  # noqa: E731
    result = descend(calls, reference, values, gate_db=40.0)
    assert result["module"] == "b.y.z"
    assert [t["module"] for t in result["trail"]] == ["b", "b.y", "b.y.z"]
    same = lambda paths: {p: np.ones(4) for p in paths}  # noqa: E731
    assert descend(calls, reference, same, 40.0)["status"] == "not_found"


def test_taps_look_inside_a_delegate_without_weight_hints(exports):
    """Re-lowering the ETRecord's program with output taps names the layer from activations
    alone (a whole UNet is often one XNNPACK delegate, too coarse for ETDump)."""
    from executorch.devtools.etrecord import parse_etrecord

    from mobile_sd.manifest import load_manifest
    from mobile_sd.parity import eager
    from mobile_sd.parity.locate import EagerModules
    from mobile_sd.parity.locate_et_taps import refine

    weight = "clip.encoder.layers.0.mlp.fc1.weight"
    folder = exports.export_folder("executorch", ("text_encoder",), ("text_encoder", weight, 0.5))
    model = eager.at_latent_size(pe.micro_model(), 8)
    reference = eager.surgery_component(model, load_manifest(folder), "text_encoder")
    inputs = reference.example_inputs(0)
    etrecord = parse_etrecord(str(folder / "text_encoder.etrecord"))
    found = refine(etrecord, EagerModules(reference.module, inputs), "clip.encoder.layers.0",
                   inputs, 60.0, "xnnpack")
    assert found["module"] == "clip.encoder.layers.0.mlp.fc1", found


def test_mil_locator_compares_only_tensors_in_the_same_layout():
    """coremltools fuses ChannelLayerNorm on (B, C, 1, S) into transpose + layer_norm +
    transpose: the layer_norm's output has the reference's element count in another layout.
    Reshaping it would compare scrambled values (measured: a healthy full-size text encoder's
    first layer norm named at 8.7 dB); such ops are skipped, size-1 dims are not a layout."""
    from mobile_sd.parity.locate_coreml import _aligned

    ref = torch.randn(1, 8, 1, 5)
    assert _aligned(ref.permute(0, 3, 2, 1).contiguous(), ref) is None
    assert torch.equal(_aligned(ref.reshape(1, 8, 5), ref), ref)
    assert _aligned(None, ref) is None and _aligned(ref, None) is None
