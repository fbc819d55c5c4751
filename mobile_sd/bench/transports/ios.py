"""Apple targets: Core ML on this Mac, and an iPhone driven with ``xcrun devicectl``.

- ``mac``: our runner on this Mac (a :class:`LocalTransport`), timing ``MLModel.predict``
  with the chosen compute units and reading Core ML's compute plan for per-op placement.
- ``ios``: a benchmark app (bundle id ``DEFAULT_BUNDLE_ID``) that speaks the runner protocol
  of :mod:`mobile_sd.bench.runner`. Files go to its data container with ``devicectl device
  copy to``, it is launched with ``devicectl device process launch --console`` (its stdout
  carries the JSON line) and the ETDump comes back with ``device copy from``. Relative paths
  in the arguments are resolved by the app against its data container.

Both need macOS with Xcode 15+; anywhere else they raise ``BackendUnavailableError`` saying
so, and the harness records every component as skipped with that reason.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from mobile_sd.bench import errors as E
from mobile_sd.bench.transports.base import LineCallback, RunResult, Transport, run_process
from mobile_sd.bench.transports.local import LocalTransport
from mobile_sd.errors import BackendUnavailableError, InvalidArgumentError

DEFAULT_BUNDLE_ID = "ai.mobilesd.bench"
APP_WORKDIR = "Documents/mobile-sd"
#: productType -> chip, for the devices SnapFusion-class models target.
CHIPS = {**dict.fromkeys(("iPhone13,1", "iPhone13,2", "iPhone13,3", "iPhone13,4"), "A14"),
         **dict.fromkeys(("iPhone14,2", "iPhone14,3", "iPhone14,4", "iPhone14,5", "iPhone14,7",
                          "iPhone14,8"), "A15"),
         **dict.fromkeys(("iPhone15,2", "iPhone15,3", "iPhone15,4", "iPhone15,5"), "A16"),
         **dict.fromkeys(("iPhone16,1", "iPhone16,2"), "A17 Pro"),
         **dict.fromkeys(("iPhone17,1", "iPhone17,2"), "A18 Pro"),
         **dict.fromkeys(("iPhone17,3", "iPhone17,4"), "A18")}


def require_macos(what: str) -> None:
    """Raise ``BackendUnavailableError`` unless this is macOS with ``xcrun`` on PATH."""
    if platform.system() != "Darwin":
        raise BackendUnavailableError(
            f"{what} needs macOS with Xcode 15+ (this is {platform.system()}): run the bench "
            "on a Mac (--target mac, or --target ios with an iPhone attached)")
    if shutil.which("xcrun") is None:
        raise BackendUnavailableError(f"{what} needs Xcode's command line tools (xcrun not "
                                      "found): install Xcode 15+ and run `xcode-select -s`")


# --------------------------------------------------------------------- devicectl commands
def list_devices_argv(json_path: str) -> list[str]:
    return ["xcrun", "devicectl", "list", "devices", "--json-output", json_path]


def copy_argv(direction: str, device: str, bundle_id: str, source: str,
              destination: str) -> list[str]:
    """``device copy to|from`` between this Mac and the app's data container."""
    return ["xcrun", "devicectl", "device", "copy", direction, "--device", device,
            "--domain-type", "appDataContainer", "--domain-identifier", bundle_id,
            "--source", source, "--destination", destination]


def launch_argv(device: str, bundle_id: str, args: Sequence[str]) -> list[str]:
    """Launch the app, stream its stdout/stderr (``--console``) and pass it ``args``."""
    return ["xcrun", "devicectl", "device", "process", "launch", "--device", device,
            "--console", "--terminate-existing", bundle_id, "--", *args]


def parse_devicectl_devices(data: dict) -> list[dict]:
    """Devices of ``devicectl list devices --json-output`` as flat dicts."""
    rows = []
    for dev in data.get("result", {}).get("devices", []):
        hw, props = dev.get("hardwareProperties", {}), dev.get("deviceProperties", {})
        conn = dev.get("connectionProperties", {})
        product = hw.get("productType")
        rows.append({
            "identifier": dev.get("identifier"), "udid": hw.get("udid"),
            "name": props.get("name"), "model": hw.get("marketingName") or product,
            "product_type": product, "chip": CHIPS.get(product),
            "abi": (hw.get("cpuType") or {}).get("name"),
            "os": f"{hw.get('platform', 'iOS')} {props.get('osVersionNumber', '?')}",
            "os_build": props.get("osBuildUpdate"), "physical": hw.get("reality") == "physical",
            "paired": conn.get("pairingState") == "paired",
            "connected": conn.get("tunnelState") == "connected",
            "transport": conn.get("transportType"),
            "developer_mode": props.get("developerModeStatus"),
            "storage_capacity_bytes": hw.get("internalStorageCapacity")})
    return rows


def pick_device(rows: list[dict], wanted: str | None) -> dict:
    """The paired physical iPhone matching ``wanted`` (UDID, identifier or name)."""
    phones = [r for r in rows if r["physical"] and r["paired"]]
    if wanted:
        match = [r for r in phones if wanted in (r["udid"], r["identifier"], r["name"])]
        if not match:
            listed = ", ".join(f"{r['name']} ({r['udid']})" for r in phones) or "none"
            raise E.DeviceNotFoundError(f"iPhone {wanted} is not paired with this Mac (paired: "
                                        f"{listed}): connect it, trust this Mac, enable "
                                        "Developer Mode, then check `xcrun devicectl list devices`")
        return match[0]
    if len(phones) != 1:
        if not phones:
            raise E.DeviceNotFoundError("no paired iPhone: connect one, trust this Mac and "
                                        "enable Developer Mode")
        raise InvalidArgumentError("several iPhones are paired; pick one with --target "
                                   "ios:UDID")
    return phones[0]


class MacCoreMLTransport(LocalTransport):
    """Core ML predictions on this Mac (``--target mac``), via the Python runner."""

    name = "mac"

    def __init__(self, workdir: str | os.PathLike | None = None) -> None:
        require_macos("Core ML predictions on a Mac (--target mac)")
        super().__init__(workdir)

    def device_info(self) -> dict:
        info = super().device_info()
        info.update(kind="mac", os=f"macOS {platform.mac_ver()[0]}")
        return info


class DevicectlTransport(Transport):
    """An iPhone running the mobile-sd benchmark app (``--target ios[:UDID]``)."""

    def __init__(self, device: str | None = None, bundle_id: str = DEFAULT_BUNDLE_ID,
                 command_timeout_s: float = 600.0) -> None:
        require_macos("benchmarking on an iPhone (--target ios)")
        self.bundle_id, self.command_timeout_s = bundle_id, command_timeout_s
        self.info = pick_device(self._list(), device)
        self.device = self.info["udid"] or self.info["identifier"]
        self.name = f"ios:{self.device}"

    @property
    def workdir(self) -> str:
        return APP_WORKDIR

    def runner_prefix(self) -> list[str]:
        return []  # the app is the runner: it gets the protocol arguments directly

    def _list(self) -> list[dict]:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "devices.json")
            self._check(run_process(list_devices_argv(path), 60), "list devices")
            return parse_devicectl_devices(json.loads(Path(path).read_text()))

    def _check(self, result: RunResult, what: str) -> RunResult:
        if result.timed_out or result.returncode != 0:
            raise E.DeviceLostError(f"`devicectl {what}` failed on {getattr(self, 'name', 'ios')}"
                                    f": {result.stderr.strip()[-300:]}; unlock the iPhone, "
                                    "check the cable and rerun")
        return result

    def push(self, local_path: str | os.PathLike, remote_path: str) -> None:
        argv = copy_argv("to", self.device, self.bundle_id, str(local_path), remote_path)
        self._check(run_process(argv, self.command_timeout_s), f"copy to {remote_path}")

    def run(self, argv: Sequence[str], timeout_s: float,
            on_line: LineCallback | None = None) -> RunResult:
        result = run_process(launch_argv(self.device, self.bundle_id, argv), timeout_s, on_line)
        if result.timed_out:
            raise E.RunnerTimeoutError(f"the benchmark app did not finish within "
                                       f"{timeout_s:.0f} s on {self.name}", result.stdout,
                                       result.stderr)
        return result

    def pull(self, remote_path: str, local_path: str | os.PathLike) -> None:
        argv = copy_argv("from", self.device, self.bundle_id, remote_path, str(local_path))
        result = run_process(argv, self.command_timeout_s)
        if result.returncode != 0:
            raise E.ArtifactMissingOnDeviceError(
                f"{remote_path} could not be copied from {self.name}: "
                f"{result.stderr.strip()[-300:]}; the app may not have written it")

    def device_info(self) -> dict:
        info = {"kind": "ios", **{k: self.info[k] for k in ("model", "os", "chip", "abi",
                                                            "product_type", "udid")}}
        info["free_storage_bytes"] = self.free_storage_bytes()
        return info

    def free_storage_bytes(self) -> int | None:
        from mobile_sd.bench.runner import parse_result_line

        line = parse_result_line(self.run(["--device-info"], 120).stdout) or {}
        return (line.get("device_info") or {}).get("free_storage_bytes")
