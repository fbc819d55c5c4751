"""Bad input to `mobile-sd parity`: a specific error and exit code 2, before anything runs."""
from __future__ import annotations

import json

import pytest

from tests.helpers import parity_exports as pe
from mobile_sd.errors import ParityError

ALL = ("text_encoder", "unet", "decoder")



def parity(cli, folder, *extra):
    return cli("parity", folder, "--spec", pe.MICRO, "--prompts", "a cat", "--quiet",
               "--out", folder.parent / f"{folder.name}.report", *extra)


def _edit_manifest(folder, edit):
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_folder_without_manifest(cli, tmp_path):
    (tmp_path / "unet.onnx").write_bytes(b"not really")
    code, _, err = cli("parity", tmp_path)
    assert code == 2
    assert "no manifest.json; this is not a folder written by `mobile-sd export`" in err


def test_missing_folder(cli, tmp_path):
    code, _, err = cli("parity", tmp_path / "nope")
    assert code == 2 and "no such artifact folder" in err


def test_sha256_mismatch(exports, cli):
    folder = exports.copy_folder(exports.export_folder("onnx", ALL), "sha")
    with open(folder / "decoder.onnx", "ab") as handle:
        handle.write(b"\0")
    code, _, err = parity(cli, folder)
    assert code == 2
    assert "decoder.onnx:" in err and "does not match manifest.json" in err


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["components"]["unet"]["inputs"][0].update(shape=[1, 4, 8, 8]),
     "input 'sample' has shape [2, 4, 8, 8] in the file, [1, 4, 8, 8] in manifest.json"),
    (lambda m: m["components"]["unet"]["inputs"][0].update(name="latents"),
     "input named 'sample' in the file where manifest.json has 'latents'"),
    (lambda m: m["components"]["decoder"]["outputs"][0].update(dtype="float16"),
     "output 'image' is float32 in the file, float16 in manifest.json"),
])
def test_onnx_io_differs_from_manifest(exports, cli, edit, message):
    folder = exports.copy_folder(exports.export_folder("onnx", ALL), f"io-{abs(hash(message))}")
    _edit_manifest(folder, edit)
    code, _, err = parity(cli, folder)
    assert code == 2
    assert message in err and "re-export" in err


def test_pte_io_differs_from_manifest(exports):
    from mobile_sd.manifest import load_manifest
    from mobile_sd.runtimes.component import open_component

    folder = exports.copy_folder(exports.export_folder("executorch", ("text_encoder",)), "pte-io")
    _edit_manifest(folder, lambda m: m["components"]["text_encoder"]["inputs"][0].update(dtype="int32"))
    with pytest.raises(ParityError, match=r"input 'input_ids' is int64 in the file, int32 in manifest"):
        open_component(folder, load_manifest(folder), "text_encoder")


def test_reference_model_of_another_spec(exports, cli):
    folder = exports.export_folder("onnx", ALL)
    code, _, err = cli("parity", folder, "--spec", "snapfusion-tiny", "--quiet")
    assert code == 2 and "exported from spec 'parity-micro'" in err


def test_bad_arguments(exports, cli):
    folder = exports.export_folder("onnx", ALL)
    code, _, err = parity(cli, folder, "--prompts", " ")
    assert code == 2 and "--prompts" in err
