"""Bad input to the Core ML export, through the CLI: a specific error, exit code 2, and no
partial or half-named package left (only what was there before).

Decoder-only exports (``--components decoder``) keep each case to seconds. Disk full is tested
twice: on a real 300 kB tmpfs when this process may mount one (root on Linux), and everywhere by
making coremltools' writer fail with ENOSPC half-way through a package.
"""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ct = pytest.importorskip("coremltools")
from tests.helpers.paths import REPO as ROOT  # noqa: E402
RECIPE = str(ROOT / "export_recipes" / "ios-snapfusion-swift.yaml")


def export(cli, out, *extra, recipe=RECIPE):
    return cli("export", "--recipe", recipe, "--spec", "snapfusion-tiny", "--latent-size", "16",
               "--components", "decoder", "--out", out, *extra)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_unknown_op_name_lists_valid_names(tmp_path, cli):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\nformat: coreml\ninterface: swift\ncompression:\n"
                      "  global_: {nbits: 6}\n  op_name: {p_decoder_conv_inn_weight: {nbits: 4}}\n")
    code, _, err = export(cli, tmp_path / "out", recipe=str(recipe))
    assert code == 2
    assert "VAEDecoder (decoder) compression: " in err
    assert "no weight const or op named 'p_decoder_conv_inn_weight'" in err
    assert "p_decoder_conv_in_weight_to_fp16" in err           # a close valid name is listed
    assert leftovers(tmp_path) == ["r.yaml"]


def test_unknown_component_in_components_flag(tmp_path, cli):
    code, _, err = cli("export", "--recipe", RECIPE, "--spec", "snapfusion-tiny",
                       "--components", "vae", "--out", tmp_path / "out")
    assert code == 2 and "valid components: text_encoder, unet, decoder" in err
    assert leftovers(tmp_path) == []


def test_output_parent_is_a_file(tmp_path, cli):
    (tmp_path / "file").write_text("x")
    code, _, err = export(cli, tmp_path / "file" / "out")
    assert code == 2 and "cannot create output folder" in err
    assert leftovers(tmp_path) == ["file"]


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder this process cannot write: a read-only tmpfs as root, chmod 555 otherwise."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if _mount(folder, "ro,size=64k") != 0:
        pytest.skip("root without permission to mount a tmpfs")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


def _mount(folder: Path, options: str) -> int:
    if not shutil.which("mount"):
        return 1
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True).returncode


def test_output_dir_not_writable(readonly_dir, cli):
    code, _, err = export(cli, readonly_dir / "out")
    assert code == 2 and "is not writable" in err
    assert leftovers(readonly_dir) == []


def test_real_disk_full_on_a_tiny_tmpfs(tmp_path, cli):
    folder = tmp_path / "small"
    folder.mkdir()
    if os.geteuid() != 0 or _mount(folder, "size=300k") != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        code, _, err = export(cli, folder / "out")
        assert code == 2 and "no space left" in err.lower()
        assert leftovers(folder) == []
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_disk_full_while_saving_a_package(tmp_path, cli, monkeypatch):
    """coremltools' writer fails half-way through the package with ENOSPC."""
    real_save = ct.models.MLModel.save

    def save_then_fail(self, path):
        real_save(self, path)                       # the package is (partly) on disk...
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(ct.models.MLModel, "save", save_then_fail)
    code, _, err = export(cli, tmp_path / "out")
    assert code == 2 and "no space left on the device while writing VAEDecoder.mlpackage" in err
    assert leftovers(tmp_path) == []


def test_interrupted_export_keeps_the_previous_output(tmp_path, cli, monkeypatch):
    """Ctrl-C after the package was written: --force must not have replaced anything yet."""
    from mobile_sd.export.coreml import flow as coreml_flow

    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("previous export")
    # ours (--force replaces only a folder whose manifest.json has our schema)
    (out / "manifest.json").write_text('{"schema": "mobile-sd/manifest/v1"}')

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(coreml_flow, "_check_packages", interrupted)   # after saving
    code, _, err = export(cli, out, "--force")
    assert code == 2 and "export interrupted; nothing was written" in err
    assert leftovers(tmp_path) == ["out"] and leftovers(out) == ["manifest.json", "previous.txt"]


# Runs the real CLI in a child process that sends itself SIGTERM once the package is saved
# into the temp folder: deterministic, unlike a parent racing a fast tiny export.
_SIGTERM_DRIVER = """
import os, signal, sys, time
from mobile_sd.export.coreml import flow as coreml_flow
from mobile_sd.commands import cli

def terminate_self(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)          # the handler interrupts this at once

coreml_flow._check_packages = terminate_self
sys.exit(cli.main(sys.argv[1:]))
"""


def test_terminated_export_cleans_up(tmp_path):
    """SIGTERM (kill, CI timeout) mid-export: exit code 2, the temp folder removed."""
    import sys

    cmd = [sys.executable, "-c", _SIGTERM_DRIVER, "export", "--recipe", RECIPE, "--spec",
           "snapfusion-tiny", "--latent-size", "16", "--components", "decoder",
           "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "export interrupted; nothing was written" in proc.stderr
    assert leftovers(tmp_path) == []
