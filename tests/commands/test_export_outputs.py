"""Real exports of the tiny spec: byte-identical when repeated (ETRecords included), replaced by
``--force`` only because they are ours, 0644 files, and an export killed by SIGTERM/SIGINT while
writing leaves the previous ``--out`` exactly as it was and no temp folder."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.commands.test_hostile_cli import snapshot
from tests.helpers.paths import RECIPES, REPO

RECIPE_FILES = {"onnx": "onnx-snapfusion.yaml", "executorch": "android-snapfusion-xnnpack-fp32.yaml",
                "coreml": "ios-snapfusion-swift.yaml"}


def _export_argv(recipe: str, out: Path, *extra) -> list:
    return ["export", "--recipe", RECIPES / RECIPE_FILES[recipe], "--spec", "snapfusion-tiny",
            "--latent-size", "8", "--components", "text_encoder", "--out", out, *extra]


def _listed_hashes(folder: Path) -> dict[str, str]:
    data = json.loads((folder / "manifest.json").read_text())
    files = [f for c in data["components"].values() for f in c["files"]] + data["extra_files"]
    return {f["path"]: f["sha256"] for f in files}


@pytest.mark.parametrize("recipe", sorted(RECIPE_FILES))
def test_exporting_twice_gives_identical_files_and_force_replaces_our_export(recipe, tmp_path,
                                                                             cli):
    out = tmp_path / "out"
    code, _, err = cli(*_export_argv(recipe, out))
    assert code == 0, err
    first = tmp_path / "first"
    shutil.copytree(out, first)
    code, _, err = cli(*_export_argv(recipe, out, "--force"))   # ours: replaced
    assert code == 0, err
    # manifest.json records when/where/how long (created, machine, export_seconds): not
    # compared byte for byte; every file it lists is, by its recorded sha256 and on disk.
    a, b = snapshot(first), snapshot(out)
    assert a.pop("manifest.json") and b.pop("manifest.json")
    assert a == b and len(a) >= 2
    assert _listed_hashes(first) == _listed_hashes(out)
    if recipe == "executorch":
        assert any(name.endswith(".etrecord") for name in a)
    modes = {str(p.relative_to(out)): oct(p.stat().st_mode & 0o777)
             for p in out.rglob("*") if p.is_file()}
    assert set(modes.values()) == {"0o644"}, modes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first", "out"]  # no leftovers


def _previous_export(folder: Path) -> None:
    """A previous export in --out (ours: manifest.json with our schema)."""
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"schema": "mobile-sd/manifest/v1"}))
    (folder / "unet.onnx").write_bytes(os.urandom(4096))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_while_exporting_keeps_previous_out_and_no_temp(signum, tmp_path):
    out = tmp_path / "out"
    _previous_export(out)
    before = snapshot(tmp_path)
    argv = [sys.executable, "-m", "mobile_sd", *map(str, _export_argv("onnx", out, "--force"))]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while not any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the export never started writing"
            time.sleep(0.05)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err
    assert "export interrupted; nothing was written" in err
    assert snapshot(tmp_path) == before   # previous export intact, no temp folder, no lock
