"""This machine as a benchmark target: a temp workdir and plain subprocesses.

It runs our Python runner (``python -m mobile_sd.bench.runner``), so host numbers are taken
exactly the way a device's would be: a fresh process per artifact, warm-up, timed iterations,
one JSON line back.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from mobile_sd.bench.errors import (ArtifactMissingOnDeviceError, InsufficientStorageError,
                                    RunnerTimeoutError)
from mobile_sd.bench.transports.base import LineCallback, RunResult, Transport, run_process


class LocalTransport(Transport):
    """Benchmark on this machine.

    Example (not run by the tests: it needs real artifacts)::

        t = LocalTransport()
        t.run([sys.executable, "-c", "print(1)"], timeout_s=10).stdout
        # -> '1\\n'
    """

    name = "local"

    def __init__(self, workdir: str | os.PathLike | None = None) -> None:
        self._own = workdir is None
        self._workdir = Path(workdir or tempfile.mkdtemp(prefix="mobile-sd-bench-"))
        self._workdir.mkdir(parents=True, exist_ok=True)

    @property
    def workdir(self) -> str:
        return str(self._workdir)

    def runner_prefix(self) -> list[str]:
        """Command that starts our runner protocol here (same interpreter as the harness)."""
        return [sys.executable, "-m", "mobile_sd.bench.runner"]

    def push(self, local_path: str | os.PathLike, remote_path: str) -> None:
        # Hard links, not copies: a UNet is 1.7 GB and this machine's disk is shared. Not
        # symlinks either: onnxruntime resolves them and then refuses external data that is
        # not in the resolved folder.
        src, dst = Path(local_path).absolute(), Path(remote_path)
        if not src.exists():
            raise ArtifactMissingOnDeviceError(
                f"{self.name}: cannot push {src}: no such file; re-export the artifact")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() or dst.exists():
            self.remove(str(dst))
        try:
            if src.is_dir():
                shutil.copytree(src, dst, copy_function=_link_or_copy)
            else:
                _link_or_copy(src, dst)
        except OSError as exc:
            if exc.errno == 28:  # ENOSPC
                raise InsufficientStorageError(
                    f"{self.name}: no space left in {self._workdir} for {src.name}; free disk "
                    "space (the workdir is a temp folder)") from exc
            raise

    def run(self, argv: Sequence[str], timeout_s: float,
            on_line: LineCallback | None = None) -> RunResult:
        # PYTHONPATH so `-m mobile_sd.bench.runner` works from the temp workdir even when
        # mobile-sd is not installed (a source checkout).
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[3])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root,
                                                          env.get("PYTHONPATH")]))
        result = run_process(argv, timeout_s, on_line, cwd=self._workdir, env=env)
        if result.timed_out:
            raise RunnerTimeoutError(
                f"{self.name}: the runner did not finish in {timeout_s:.0f} s and was killed; "
                "raise the timeout or use fewer --iters", result.stdout, result.stderr)
        return result

    def pull(self, remote_path: str, local_path: str | os.PathLike) -> None:
        src = Path(remote_path)
        if not src.exists():
            raise ArtifactMissingOnDeviceError(
                f"{self.name}: {src} was not written by the runner; see its stderr above")
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(src, local_path)
        except OSError as exc:
            if exc.errno == 28:  # ENOSPC
                raise InsufficientStorageError(
                    f"{self.name}: no space left copying {src} to {local_path}; free disk "
                    "space or choose another --out") from exc
            raise

    def remove(self, remote_path: str) -> None:
        path = Path(remote_path)
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path, ignore_errors=True)

    def device_info(self) -> dict:
        from mobile_sd.utils.env import machine_info

        info = machine_info()
        return {"kind": "local", "model": info["cpu"], "os": f"{info['system']} {info['release']}",
                "abi": info["machine"], "cores": info["cores"], "memory_gb": info["memory_gb"],
                "free_storage_bytes": self.free_storage_bytes()}

    def free_storage_bytes(self) -> int | None:
        return shutil.disk_usage(self._workdir).free

    def close(self) -> None:
        if self._own:
            shutil.rmtree(self._workdir, ignore_errors=True)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)
