"""``make parity``: checks every export folder present under OUT (a clean clone that ran only
``make export-ios`` has no Android folder), and says what to do when there is none."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.mil_exports import copy_export, export

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def _make(out: Path) -> subprocess.CompletedProcess:
    # BIN = this interpreter's folder: the venv the tests run in.
    return subprocess.run(["make", "-s", "parity", f"OUT={out}", "SPEC=snapfusion-tiny",
                           f"BIN={Path(sys.executable).parent}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)


def test_make_parity_without_exports_says_what_to_run(tmp_path):
    proc = _make(tmp_path)
    assert proc.returncode == 2
    assert "make export-ios" in proc.stderr and not list(tmp_path.iterdir())


def test_make_parity_checks_an_ios_export_alone(tmp_path):
    copy_export(export("ios-snapfusion-fast", "snapfusion-tiny"), tmp_path / "ios")
    proc = _make(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "ios.parity" / "parity.json").read_text())
    assert report["summary"]["status"] == "pass" and report["summary"]["skipped"] == 0
    assert {c["runtime"] for c in report["components"].values()} == {"coreml"}
