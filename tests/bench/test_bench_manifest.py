"""Manifest checks of the bench: every malformed input is an error that names the key."""
from __future__ import annotations

import copy
import hashlib
import json

import pytest

from mobile_sd.bench.errors import BenchManifestError
from mobile_sd.bench.manifest import bench_items, load_manifest, pipeline
from mobile_sd.errors import ParityError

GOOD = {"schema": "mobile-sd/manifest/v1", "recipe": {"name": "r"},
        "pipeline": {"steps": 8, "cfg": "batch2"},
        "components": {"unet": {
            "files": [{"path": "unet.pte", "format": "pte", "backend": "xnnpack"},
                      {"path": "unet.ptd", "format": "ptd"},
                      {"path": "unet.etrecord", "format": "etrecord"}],
            "inputs": [{"name": "sample", "shape": [2, 4, 64, 64], "dtype": "float32"}]}}}


def _folder(tmp_path, manifest):
    for name in ("unet.pte", "unet.ptd", "unet.etrecord"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def test_good_manifest(tmp_path):
    folder = _folder(tmp_path, GOOD)
    [item] = bench_items(load_manifest(folder), folder)
    assert (item.component, item.format, item.backend) == ("unet", "pte", "xnnpack")
    assert item.data_file == folder / "unet.ptd" and item.etrecord == folder / "unet.etrecord"
    assert pipeline(GOOD) == {"steps": 8, "cfg": "batch2"}


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
     "gone.pte is listed but missing"),
    (lambda m: m["components"]["unet"]["inputs"][0].update(dtype="bfloat16"),
     "dtype 'bfloat16' is not one of"),
    (lambda m: m["components"]["unet"]["inputs"][0].update(shape=[2, -4]),
     "inputs[0] must be {name: str, shape: [positive ints], dtype}"),
    (lambda m: m["components"]["unet"].pop("inputs"), "'inputs' must be a non-empty list"),
])
def test_malformed_components(tmp_path, edit, words):
    manifest = copy.deepcopy(GOOD)
    edit(manifest)
    folder = _folder(tmp_path, manifest)
    with pytest.raises(BenchManifestError) as info:
        bench_items(load_manifest(folder), folder)
    assert words in str(info.value)


@pytest.mark.parametrize("pipe, words", [
    ({"steps": 0, "cfg": "batch2"}, "pipeline.steps must be an integer >= 1"),
    ({"steps": 8, "cfg": "guided"}, "pipeline.cfg must be one of"),
])
def test_malformed_pipeline(pipe, words):
    with pytest.raises(BenchManifestError, match=words.replace(".", r"\.")):
        pipeline({**GOOD, "pipeline": pipe})
    assert pipeline({k: v for k, v in GOOD.items() if k != "pipeline"}) is None


def test_changed_artifact_is_an_error_not_a_measurement(tmp_path):
    from mobile_sd.bench import run_bench

    manifest = copy.deepcopy(GOOD)
    manifest["components"]["unet"]["files"][0]["sha256"] = hashlib.sha256(b"old").hexdigest()
    (tmp_path / "export").mkdir()
    folder = _folder(tmp_path / "export", manifest)
    [r] = run_bench(folder, "local", 1, 1, tmp_path / "bench", render=False)
    assert r["status"] == "error" and "changed after export" in r["reason"]
    assert r["stats"]["n"] == 0
