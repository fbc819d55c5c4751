"""`mobile-sd parity` on correct exports: passes, reports written, skips reported as skips."""
from __future__ import annotations

import json
import platform
import sys

import pytest

from tests.helpers import parity_exports as pe
from mobile_sd.parity.report import validate_report

ALL = ("text_encoder", "unet", "decoder")



def parity(cli, folder, out, *extra):
    return cli("parity", folder, "--spec", pe.MICRO, "--prompts", "a cat", "--out", out,
               "--threads", "1", "--quiet", *extra)


def test_correct_onnx_export_passes_and_writes_the_report(exports, cli, tmp_path):
    folder = exports.export_folder("onnx", ALL)
    code, out, err = parity(cli, folder, tmp_path / "report")
    assert code == 0, out + err
    for name in ALL:
        assert f"PASS  {name}" in out
    assert "PASS  e2e" in out and "PASS (4 passed, 0 failed, 0 skipped)" in out

    report = json.loads((tmp_path / "report" / "parity.json").read_text())
    validate_report(report)
    manifest = json.loads((folder / "manifest.json").read_text())
    unet = report["components"]["unet"]
    assert unet["files"][0]["sha256"] == manifest["components"]["unet"]["files"][0]["sha256"]
    assert unet["inputs"] == {"random": 2, "pipeline": 8}       # 8 steps, both CFG branches
    assert unet["tiers"]["fp32"]["worst"]["psnr_db"] > 100      # fp32 ONNX: summation order only
    assert unet["tiers"]["lowering"]["status"] == "pass"
    assert report["tool_versions"]["onnxruntime"] and report["schema"] == "mobile-sd/parity/v1"
    assert report["e2e"]["min_ssim"] > 0.99

    markdown = (tmp_path / "report" / "parity.md").read_text()
    assert "| unet | unet.onnx | onnxruntime | PASS |" in markdown
    from PIL import Image

    grid = Image.open(tmp_path / "report" / "parity_grid.png")
    assert grid.width == 3 * 256                                   # reference, export, diff


def test_correct_executorch_export_passes_with_eager_rest(exports, cli, tmp_path):
    folder = exports.export_folder("executorch", ("text_encoder",))
    code, out, err = parity(cli, folder, tmp_path / "report")
    assert code == 0, out + err
    report = json.loads((tmp_path / "report" / "parity.json").read_text())
    assert report["components"]["text_encoder"]["runtime"] == "executorch"
    assert report["e2e"]["eager_components"] == ["unet", "decoder"]   # not exported: said so


@pytest.mark.skipif(platform.system() == "Darwin", reason="Core ML runs on macOS")
def test_coreml_runs_on_the_mil_runtime_off_macos(exports, cli, tmp_path):
    """Off macOS a Core ML package is executed by the MIL runtime: a real row, never a skip."""
    folder = exports.export_folder("coreml", ("decoder",))
    code, out, _ = parity(cli, folder, tmp_path / "report", "--fail-on-skip")
    assert code == 0, out
    assert "PASS  decoder      decoder.mlpackage [coreml fp32]: fp32" in out
    report = json.loads((tmp_path / "report" / "parity.json").read_text())
    assert report["summary"] == {"status": "pass", "passed": 2, "failed": 0, "skipped": 0}
    decoder = report["components"]["decoder"]
    assert decoder["runtime"] == "coreml" and decoder["tiers"]["fp32"]["worst"]["psnr_db"] > 60


def test_missing_runtime_is_an_explicit_skip(exports, cli, tmp_path, monkeypatch):
    folder = exports.export_folder("onnx", ALL)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)            # import now fails
    code, out, _ = parity(cli, folder, tmp_path / "report")
    assert code == 0
    assert "SKIP  unet         unet.onnx: onnxruntime is not installed" in out
    report = json.loads((tmp_path / "report" / "parity.json").read_text())
    assert report["summary"]["passed"] == 0 and report["summary"]["status"] == "skip"
