"""Apple targets: devicectl commands and JSON parsing, and the off-macOS skip."""
from __future__ import annotations

import json
import platform

import pytest

from mobile_sd.bench import errors as E
from mobile_sd.bench.transports import ios
from mobile_sd.errors import BackendUnavailableError, InvalidArgumentError

from tests.helpers.paths import DATA as _DATA  # noqa: E402
from tests.helpers import manifests

DATA = _DATA / "bench"
UDID = "00008120-001A2B3C4D5E6F70"


def _devices():
    return ios.parse_devicectl_devices(json.loads((DATA / "devicectl_list_devices.json")
                                                  .read_text()))


def test_parse_devicectl_devices():
    phone, other = _devices()
    assert phone == {
        "identifier": "5A1B2C3D-4E5F-6071-8293-A4B5C6D7E8F9", "udid": UDID,
        "name": "Bench iPhone", "model": "iPhone 14 Pro", "product_type": "iPhone15,2",
        "chip": "A16", "abi": "arm64e", "os": "iOS 18.1", "os_build": "22B83",
        "physical": True, "paired": True, "connected": True, "transport": "wired",
        "developer_mode": "enabled", "storage_capacity_bytes": 256000000000}
    assert other["chip"] == "A17 Pro" and not other["paired"] and not other["connected"]


def test_pick_device():
    rows = _devices()
    assert ios.pick_device(rows, None)["udid"] == UDID  # the only paired phone
    assert ios.pick_device(rows, "Bench iPhone")["udid"] == UDID
    with pytest.raises(E.DeviceNotFoundError, match="00008130-000A1B2C3D4E5F60 is not paired"):
        ios.pick_device(rows, "00008130-000A1B2C3D4E5F60")
    with pytest.raises(InvalidArgumentError, match="ios:UDID"):
        ios.pick_device(rows + rows, None)


def test_devicectl_commands():
    assert ios.list_devices_argv("/tmp/d.json") == [
        "xcrun", "devicectl", "list", "devices", "--json-output", "/tmp/d.json"]
    assert ios.copy_argv("to", UDID, "ai.mobilesd.bench", "out/unet.mlpackage",
                         "Documents/mobile-sd/unet.mlpackage") == [
        "xcrun", "devicectl", "device", "copy", "to", "--device", UDID,
        "--domain-type", "appDataContainer", "--domain-identifier", "ai.mobilesd.bench",
        "--source", "out/unet.mlpackage", "--destination", "Documents/mobile-sd/unet.mlpackage"]
    assert ios.launch_argv(UDID, "ai.mobilesd.bench", ["--artifact", "a.pte"]) == [
        "xcrun", "devicectl", "device", "process", "launch", "--device", UDID, "--console",
        "--terminate-existing", "ai.mobilesd.bench", "--", "--artifact", "a.pte"]


@pytest.mark.skipif(platform.system() == "Darwin", reason="checks the behaviour off macOS")
@pytest.mark.parametrize("target", ["ios", f"ios:{UDID}", "mac", "mac:CPU_AND_NE"])
def test_apple_targets_are_skipped_off_macos(target, tmp_path):
    from mobile_sd.bench import run_bench

    folder = tmp_path / "coreml"
    (folder / "unet.mlpackage").mkdir(parents=True)
    (folder / "unet.mlpackage" / "Manifest.json").write_text("{}")
    manifests.write(folder, ({
        "schema": "mobile-sd/manifest/v1", "recipe": {}, "pipeline": {"steps": 8, "cfg": "folded"},
        "components": {"unet": {"files": [{"path": "unet.mlpackage", "format": "mlpackage"}],
                                "inputs": [{"name": "sample", "shape": [1, 4, 64, 64],
                                            "dtype": "float16"}]}}}))
    [result] = run_bench(folder, target, 1, 2, tmp_path / "bench")
    if target == "ios":
        from mobile_sd.report.bench_report import render_report

        render_report(tmp_path / "bench" / "bench.jsonl", tmp_path / "bench")
    assert result["status"] == "skipped" and result["error"] is None
    assert "needs macOS with Xcode 15+" in result["reason"]
    assert result["stats"]["n"] == 0 and result["iteration_ms"] == []
    if target == "ios":
        text = (tmp_path / "bench" / "bench.md").read_text()
        assert "| unet | unet.mlpackage | mlpackage | skipped | - |" in text
        assert "no component was measured" in text
    with pytest.raises(BackendUnavailableError, match="needs macOS with Xcode 15"):
        ios.require_macos("benchmarking on an iPhone (--target ios)")


def test_coreml_runner_off_macos_reports_skipped(tmp_path):
    """The runner itself (what --target mac runs) says 'skipped', never a number."""
    import argparse

    from mobile_sd.bench.backends import _bench_coreml

    if platform.system() == "Darwin":
        pytest.skip("checks the behaviour off macOS")
    args = argparse.Namespace(compute_units="CPU_AND_NE")
    with pytest.raises(BackendUnavailableError, match="--target mac on a Mac"):
        _bench_coreml(tmp_path / "unet.mlpackage", {}, args, None)
