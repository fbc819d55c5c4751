"""Manifest checks of the bench: every malformed input is an error that names the key."""
from __future__ import annotations

import copy
import hashlib

import pytest

from mobile_sd.bench.errors import BenchManifestError
from mobile_sd.bench.manifest import bench_items, load_manifest, pipeline
from mobile_sd.errors import ParityError

from tests.helpers import manifests

X = {"bytes": 1, "sha256": hashlib.sha256(b"x").hexdigest()}   # what _folder writes
GOOD = {"schema": "mobile-sd/manifest/v1", "recipe": {"name": "r"},
        "pipeline": {"steps": 8, "cfg": "batch2"},
        "components": {"unet": {
            "files": [{"path": "unet.pte", "format": "pte", "backend": "xnnpack", **X},
                      {"path": "unet.ptd", "format": "ptd", **X},
                      {"path": "unet.etrecord", "format": "etrecord", **X}],
            "inputs": [{"name": "sample", "shape": [2, 4, 64, 64], "dtype": "float32"}]}}}


def _folder(tmp_path, manifest):
    for name in ("unet.pte", "unet.ptd", "unet.etrecord"):
        (tmp_path / name).write_bytes(b"x")
    manifests.write(tmp_path, manifest)
    return tmp_path


def test_good_manifest(tmp_path):
    folder = _folder(tmp_path, GOOD)
    [item] = bench_items(load_manifest(folder), folder)
    assert (item.component, item.format, item.backend) == ("unet", "pte", "xnnpack")
    assert item.data_file == folder / "unet.ptd" and item.etrecord == folder / "unet.etrecord"
    assert pipeline(manifests.typed(GOOD, folder)) == {"steps": 8, "cfg": "batch2"}


def test_missing_and_invalid_manifest(tmp_path):
    with pytest.raises(ParityError, match="no manifest.json"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ParityError, match="invalid JSON"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("edit, words", [
    (lambda m: m["components"]["unet"].pop("files"), "components.unet.files must be"),
    (lambda m: m["components"]["unet"]["files"].pop(0), "has no runnable file"),
    (lambda m: m["components"]["unet"]["files"][0].update(path="gone.pte"),
     "gone.pte: listed in manifest.json (unet) but missing"),
    (lambda m: m["components"]["unet"]["files"][0].update(path="../unet.pte"),
     "files[0].path must be a relative path inside the folder"),
    (lambda m: m["components"]["unet"]["inputs"][0].update(dtype="bfloat16"),
     "inputs[0].dtype must be one of float32"),
    (lambda m: m["components"]["unet"]["inputs"][0].update(shape=[2, -4]),
     "inputs[0].shape must be a list of positive integers"),
    (lambda m: m["components"]["unet"].pop("inputs"), "components.unet.inputs must be a list"),
    (lambda m: m["components"].update(unet=[]), "components.unet must be an object"),
])
def test_malformed_components(tmp_path, edit, words):
    manifest = copy.deepcopy(GOOD)
    edit(manifest)
    folder = _folder(tmp_path, manifest)
    with pytest.raises(ParityError) as info:   # ManifestError or BenchManifestError
        bench_items(load_manifest(folder), folder)
    assert words in str(info.value)


@pytest.mark.parametrize("pipe, words", [
    ({"steps": 0, "cfg": "batch2"}, "pipeline.steps must be an integer >= 1"),
    ({"steps": 8, "cfg": "guided"}, "pipeline.cfg must be one of"),
])
def test_malformed_pipeline(pipe, words):
    with pytest.raises(BenchManifestError, match=words.replace(".", r"\.")):
        pipeline(manifests.typed({**GOOD, "pipeline": pipe}))
    assert pipeline(manifests.typed({k: v for k, v in GOOD.items() if k != "pipeline"})) is None


@pytest.mark.parametrize("changed", ["unet.pte", "unet.ptd", "unet.etrecord"])
def test_changed_file_is_refused_before_anything_runs(tmp_path, changed):
    """Every listed file is verified, companions too: a changed .ptd would be measured (and
    fed to the program) as if it were the exported one."""
    from mobile_sd.bench import run_bench

    (tmp_path / "export").mkdir()
    folder = _folder(tmp_path / "export", GOOD)
    (folder / changed).write_bytes(b"y")   # same size, other bytes
    with pytest.raises(ParityError, match=f"{changed}: sha256 .* does not match manifest.json"):
        run_bench(folder, "local", 1, 1, tmp_path / "bench")
    assert not (tmp_path / "bench" / "bench.jsonl").exists()
