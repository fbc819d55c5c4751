"""SIGTERM/SIGINT while ``generate`` runs: exit 130, no PNG, no temp folder, no lock file."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.commands.test_hostile_cli import snapshot
from tests.helpers.paths import REPO


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_while_generating_leaves_nothing(signum, tmp_path):
    (tmp_path / "keep.txt").write_text("the user's file\n")
    before = snapshot(tmp_path)
    argv = [sys.executable, "-m", "mobile_sd", "generate", "--spec", "snapfusion-tiny",
            "--latent-size", "8", "--steps", "1000", "--prompt", "a cat", "--quiet",
            "--out", str(tmp_path / "a.png"), "--record", str(tmp_path / "r.safetensors")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / ".a.png.lock").exists():   # outputs checked and locked: running
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "generate never started"
            time.sleep(0.05)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.strip() == "mobile-sd: interrupted; no partial output was kept"
    assert snapshot(tmp_path) == before
