"""coremltools' nested progress bars stay out of logs (stderr not a terminal); ours stay."""
from __future__ import annotations

import contextlib
import io

import pytest

pytest.importorskip("coremltools")
from tests.helpers.paths import RECIPES  # noqa: E402

# Descriptions coremltools 9.0 gives its bars (frontend, MIL pass pipelines, compression).
COREMLTOOLS_BARS = ("Converting PyTorch Frontend", "Running MIL", "Running compression pass")


def test_export_log_has_no_coremltools_bars(tmp_path, one_thread):
    from mobile_sd.commands.cli import main

    stderr = io.StringIO()   # not a TTY, like a CI log
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        code = main(["export", "--recipe", str(RECIPES / "ios-snapfusion-fast.yaml"),
                     "--spec", "sd15-tiny", "--latent-size", "16", "--out", str(tmp_path / "o")])
    log = stderr.getvalue()
    assert code == 0, log[-2000:]
    assert not [line for line in log.replace("\r", "\n").splitlines()
                if any(bar in line for bar in COREMLTOOLS_BARS)]
    assert "export:" in log    # the engine's own bar is kept


def test_scope_restores_the_names_and_keeps_terminal_bars():
    import tqdm
    from coremltools.converters.mil.mil.passes import pass_pipeline

    from mobile_sd.export.coreml.progress import coremltools_progress

    with coremltools_progress() as names:
        assert "coremltools.converters.mil.mil.passes.pass_pipeline.tqdm" in names
        scoped = pass_pipeline.tqdm
        assert scoped(range(3), file=io.StringIO()).disable          # a log: off
        assert not scoped(range(3), file=io.StringIO(), disable=False).disable  # caller wins
    assert pass_pipeline.tqdm is tqdm.tqdm
