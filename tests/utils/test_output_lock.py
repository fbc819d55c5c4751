"""One writer per output: a lock held by another process is refused naming its pid; the lock
file is gone once released; a signal during the rename swap is delivered after it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from mobile_sd.errors import OutputDirError
from mobile_sd.utils.files import atomic_output_dir, deferred_signals, output_lock
from tests.helpers.paths import REPO

HOLDER = """
import sys, time
from mobile_sd.utils.files import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def test_a_second_process_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirError, match=f"another mobile-sd process \\(pid {holder.pid}"):
            with atomic_output_dir(out):
                pass
    finally:
        holder.communicate("done\n", timeout=60)
    assert sorted(p.name for p in tmp_path.iterdir()) == []   # lock file removed on release
    with atomic_output_dir(out) as tmp:      # free again
        (tmp / "x").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_lock_is_reentrant_across_sequential_holders(tmp_path):
    for _ in range(3):
        with output_lock(tmp_path / "o"):
            assert (tmp_path / ".o.lock").read_text().strip() == str(os.getpid())
    assert list(tmp_path.iterdir()) == []


def test_signal_during_swap_is_delivered_after_it():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: seen.append("handled"))
    try:
        with deferred_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            seen.append("swap finished")
        assert seen == ["swap finished", "handled"]
    finally:
        signal.signal(signal.SIGTERM, previous)
