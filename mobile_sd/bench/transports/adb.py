"""An Android phone over ``adb``, running ExecuTorch's ``executor_runner``.

Every call is ``adb -s SERIAL ...`` (never the implicit "only device"), with a timeout. Remote
commands are one shell string (``adb shell`` joins its arguments with spaces anyway) that
ends with ``; echo __MOBILE_SD_RC=$?``: old adb versions always exit 0, so the marker is the
only reliable exit code. See ``docs/android_runner.md`` for building the runner.
"""
from __future__ import annotations

import os
import posixpath
import shlex
from pathlib import Path
from typing import Sequence

from mobile_sd.bench import errors as E
from mobile_sd.bench.transports import adb_output as out
from mobile_sd.bench.transports.base import LineCallback, RunResult, Transport, run_process
from mobile_sd.errors import BackendUnavailableError, InvalidArgumentError

DEFAULT_WORKDIR = "/data/local/tmp/mobile-sd"
PROPS = {"model": "ro.product.model", "os": "ro.build.version.release",
         "abi": "ro.product.cpu.abi", "sdk": "ro.build.version.sdk", "soc": "ro.soc.model"}


class AdbTransport(Transport):
    """One Android device. ``serial=None`` picks the only connected device.

    >>> t = AdbTransport("R5CT32ABCDE")   # no I/O until the first command
    >>> t.shell_argv("ls")
    ['adb', '-s', 'R5CT32ABCDE', 'shell', 'ls']
    """

    def __init__(self, serial: str | None = None, workdir: str = DEFAULT_WORKDIR,
                 adb: str = "adb", command_timeout_s: float = 600.0) -> None:
        self.serial, self.adb, self._workdir = serial, adb, workdir
        self.command_timeout_s = command_timeout_s
        self.name = f"adb:{serial}" if serial else "adb"
        self._connected = False

    @property
    def workdir(self) -> str:
        return self._workdir

    # ------------------------------------------------------------------ commands
    def adb_argv(self, *args: str) -> list[str]:
        return [self.adb, "-s", str(self.serial), *args]

    def shell_argv(self, command: str) -> list[str]:
        return self.adb_argv("shell", command)

    def _call(self, argv: Sequence[str], phase: str, timeout_s: float | None = None,
              on_line: LineCallback | None = None) -> RunResult:
        try:
            result = run_process(argv, timeout_s or self.command_timeout_s, on_line)
        except FileNotFoundError as exc:
            raise BackendUnavailableError(
                f"`{self.adb}` was not found: install Android platform-tools and put adb on "
                "PATH (or pass its path)") from exc
        if result.timed_out and phase != "run":
            raise E.DeviceLostError(f"device {self.serial} did not answer `{' '.join(argv[3:])}` "
                                    f"within {timeout_s or self.command_timeout_s:.0f} s: "
                                    "replug it and rerun")
        # adb's own errors go to stderr; `devices -l` lists states ("unauthorized") on stdout.
        fault = out.adb_fault(str(self.serial), result.stderr, phase, self._connected)
        if fault is not None:
            fault.partial_output = (result.stdout, result.stderr)
            raise fault
        return result

    # ------------------------------------------------------------------ session
    def connect(self) -> None:
        """Check the device is there and usable; create the workdir. Idempotent."""
        if self._connected:
            return
        listing = self._call([self.adb, "devices", "-l"], "connect", 30).stdout
        rows = out.parse_devices(listing)
        ready = [r["serial"] for r in rows if r["state"] == "device"]
        if self.serial is None:
            if not ready:
                raise E.DeviceNotFoundError(
                    "no Android device is connected (`adb devices -l` lists none ready): plug "
                    "one in, enable USB debugging and accept the prompt on the phone")
            if len(ready) > 1:
                raise InvalidArgumentError(f"several Android devices are connected "
                                           f"({', '.join(ready)}); pick one with "
                                           "--target adb:SERIAL")
            self.serial, self.name = ready[0], f"adb:{ready[0]}"
        row = next((r for r in rows if r["serial"] == self.serial), None)
        if row is None:
            listed = ", ".join(f"{r['serial']} ({r['state']})" for r in rows) or "none"
            raise E.DeviceNotFoundError(
                f"device {self.serial} is not connected (`adb devices -l` lists: {listed}): "
                "plug it in, enable USB debugging, or pass a listed serial as "
                "--target adb:SERIAL")
        if row["state"] == "unauthorized":
            raise out.adb_fault(self.serial, "device unauthorized", "connect", False)
        if row["state"] != "device":
            raise E.DeviceNotFoundError(
                f"device {self.serial} is {row['state']}: replug it, unlock it, wait until "
                "`adb devices -l` shows it as 'device', then rerun")
        self._call(self.shell_argv(f"mkdir -p {shlex.quote(self._workdir)}"), "connect")
        self._connected = True

    def push(self, local_path: str | os.PathLike, remote_path: str) -> None:
        from mobile_sd.utils.files import size_bytes

        self.connect()
        local = Path(local_path)
        if not local.exists():
            raise InvalidArgumentError(f"cannot push {local}: no such local file")
        need, free = size_bytes(local), self.free_storage_bytes()
        if free is not None and need > free:
            raise E.InsufficientStorageError(
                f"device {self.serial} has {free / 2**20:.0f} MiB free in {self._workdir} but "
                f"{local.name} needs {need / 2**20:.0f} MiB: free space on the phone and rerun")
        result = self._call(self.adb_argv("push", str(local), remote_path), "push")
        if result.returncode != 0:
            raise E.DeviceError(f"`adb push {local.name}` to device {self.serial} failed: "
                                f"{result.stderr.strip() or result.stdout.strip()}")

    def run(self, argv: Sequence[str], timeout_s: float,
            on_line: LineCallback | None = None) -> RunResult:
        """Run in the workdir; ``returncode`` is the remote command's, from the marker."""
        self.connect()
        command = (f"cd {shlex.quote(self._workdir)} && {shlex.join(argv)}; "
                   f"echo {out.RC_MARKER}$?")
        result = self._call(self.shell_argv(command), "run", timeout_s, on_line)
        stdout, code = out.split_rc(result.stdout)
        if result.timed_out:
            raise E.RunnerTimeoutError(
                f"{posixpath.basename(argv[0])} did not finish within {timeout_s:.0f} s on "
                f"device {self.serial} and was stopped: raise the timeout or lower --iters",
                stdout, result.stderr)
        return RunResult(result.returncode if code is None else code, stdout, result.stderr,
                         result.elapsed_s)

    def pull(self, remote_path: str, local_path: str | os.PathLike) -> None:
        self.connect()
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        result = self._call(self.adb_argv("pull", remote_path, str(local_path)), "pull")
        fault = out.missing_file(str(self.serial), result.stderr + result.stdout, remote_path)
        if fault is not None or result.returncode != 0:
            raise fault or E.DeviceError(f"`adb pull {remote_path}` from device {self.serial} "
                                         f"failed: {result.stderr.strip()}")

    def remove(self, remote_path: str) -> None:
        self._call(self.shell_argv(f"rm -rf {shlex.quote(remote_path)}"), "cleanup", 60)

    def getprop(self, key: str) -> str | None:
        value = self._call(self.shell_argv(f"getprop {key}"), "device info").stdout.strip()
        return value or None

    def device_info(self) -> dict:
        self.connect()
        info = {"kind": "android", "serial": self.serial}
        info.update({field: self.getprop(key) for field, key in PROPS.items()})
        info["os"] = f"Android {info['os']}" if info["os"] else None
        info["free_storage_bytes"] = self.free_storage_bytes()
        return info

    def free_storage_bytes(self) -> int | None:
        where = posixpath.dirname(self._workdir.rstrip("/")) or "/"
        result = self._call(self.shell_argv(f"df {shlex.quote(where)}"), "device info")
        return out.parse_df_free_bytes(result.stdout)

    def stop_remote(self, remote_binary: str) -> None:
        """Stop a runner left running after a timeout, matching its full path in our workdir."""
        try:
            self._call(self.shell_argv(f"pkill -f {shlex.quote(remote_binary)}"), "cleanup", 30)
        except E.DeviceError:
            pass
