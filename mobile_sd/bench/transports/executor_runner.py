"""Drive ExecuTorch's ``executor_runner`` on an Android device; return a protocol line.

Flags (``examples/portable/executor_runner/executor_runner.cpp``, gflags):
``--model_path``, ``--num_executions``, ``--cpu_threads``, ``--data_path`` (.ptd) and, only
when built with ``EXECUTORCH_ENABLE_EVENT_TRACER=ON``, ``--etdump_path``. gflags rejects an
unknown flag, so the binary is searched for the flag names before they are passed.

The runner has no warm-up flag: it runs ``warmup + iters`` executions and the first ``warmup``
are dropped. Per-iteration times come, in order of preference, from its ``Iteration i of N``
lines (recent releases), the ETDump's ``Method::execute`` events, or only the printed total
(older runners without event tracer: the mean then includes warm-up, and the result says so).
The binary is wrapped in toybox ``time -v`` when the phone has it, for the peak RSS.
"""
from __future__ import annotations

import posixpath
from pathlib import Path

from mobile_sd.bench import errors as E
from mobile_sd.bench.runner import PROTOCOL
from mobile_sd.bench.transports import adb_output as out
from mobile_sd.bench.transports.base import signal_name

REMOTE_NAME = "executor_runner"
#: Exit codes of executor_runner itself; under toybox `time`, a signal N exits with N.
RUNNER_EXIT_CODES = {0, 1}


def runner_features(runner: Path) -> dict:
    """Which optional flags this build accepts (gflags keeps flag names as strings)."""
    blob = Path(runner).read_bytes()
    return {flag: flag.encode() in blob for flag in ("etdump_path", "data_path", "cpu_threads")}


def executor_runner_argv(runner: str, model: str, num_executions: int, *,
                         etdump: str | None = None, data_path: str | None = None,
                         threads: int | None = None, time_v: bool = False) -> list[str]:
    """The remote command line.

    >>> executor_runner_argv("/data/local/tmp/mobile-sd/executor_runner", "unet.pte", 12,
    ...                      etdump="unet.etdp", time_v=True)   # doctest: +NORMALIZE_WHITESPACE
    ['toybox', 'time', '-v', '/data/local/tmp/mobile-sd/executor_runner',
     '--model_path', 'unet.pte', '--num_executions', '12', '--etdump_path', 'unet.etdp']
    """
    argv = (["toybox", "time", "-v"] if time_v else []) + [
        runner, "--model_path", model, "--num_executions", str(num_executions)]
    for flag, value in (("--etdump_path", etdump), ("--data_path", data_path),
                        ("--cpu_threads", threads)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


class ExecutorRunnerDriver:
    """Pushes the runner once per session, then benchmarks ``.pte`` files with it."""

    def __init__(self, transport, runner: Path) -> None:
        if not Path(runner).is_file():
            raise E.ArtifactMissingOnDeviceError(
                f"--runner {runner} does not exist: build executor_runner for Android as in "
                "docs/android_runner.md and pass its path")
        self.transport, self.runner = transport, Path(runner)
        self.features = runner_features(self.runner)
        self.remote_runner = transport.remote(REMOTE_NAME)
        self._ready = False
        self.time_v = False

    def _prepare(self) -> None:
        if self._ready:
            return
        t = self.transport
        t.push(self.runner, self.remote_runner)
        t._call(t.shell_argv(f"chmod 755 {self.remote_runner}"), "push")
        probe = t._call(t.shell_argv("toybox time -v true"), "device info")
        self.time_v = "Max RSS" in probe.stderr + probe.stdout
        self._ready = True

    def bench(self, artifact: Path, warmup: int, iters: int, *, timeout_s: float,
              etdump_local: Path | None = None, data_file: Path | None = None,
              threads: int | None = None, on_line=None) -> dict:
        """Run one ``.pte``; faults carry ``partial`` (iterations that finished) when known."""
        self._prepare()
        t = self.transport
        model = t.remote(artifact.name)
        data = t.remote(data_file.name) if data_file and self.features["data_path"] else None
        etdump = (t.remote(f"{artifact.stem}.etdp")
                  if etdump_local is not None and self.features["etdump_path"] else None)
        argv = executor_runner_argv(
            self.remote_runner, model, warmup + iters, etdump=etdump, data_path=data,
            threads=threads if self.features["cpu_threads"] else None, time_v=self.time_v)
        pushed = [model] + ([data] if data else []) + ([etdump] if etdump else [])
        try:
            t.push(artifact, model)  # inside the try: a failed push may leave a partial file
            if data:
                t.push(data_file, data)
            result = t.run(argv, timeout_s, on_line)
            self._check(result, artifact.name)
            line = self._line(result.stdout + result.stderr, artifact, warmup)
            if etdump is not None:
                t.pull(etdump, etdump_local)
                line.update(etdump=str(etdump_local), etdump_skip_runs=warmup)
                if not line["iteration_ms"]:
                    from mobile_sd.runtimes.etdump import run_times_ms

                    line["iteration_ms"] = run_times_ms(etdump_local, warmup)
                    line["timing_source"] = "etdump"
            return line
        except E.DeviceError as exc:
            text = "".join(getattr(exc, "partial_output", ()) or
                           (getattr(exc, "stdout", ""), getattr(exc, "stderr", "")))
            exc.partial = self._line(text, artifact, warmup) if text else None
            if isinstance(exc, E.RunnerTimeoutError):
                t.stop_remote(self.remote_runner)
            raise
        finally:
            for path in pushed:
                try:
                    t.remove(path)
                except E.DeviceError:
                    pass  # the device is gone; the original fault is what matters

    def _check(self, result, name: str) -> None:
        serial, code, text = self.transport.serial, result.returncode, result.stdout + result.stderr
        if code == 0:
            return
        if code in (126, 127):  # the shell could not find / execute the runner
            raise out.missing_error(serial, self.remote_runner)
        # A missing model makes the runner log "Failed to open ..." and then abort.
        missing = out.missing_file(serial, text, name)
        if missing is not None:
            raise missing
        errors = [l for l in text.splitlines() if l.startswith(("E ", "F "))][-3:]
        detail = " | ".join(errors or text.strip().splitlines()[-3:])
        sig = signal_name(code) or (self.time_v and code not in RUNNER_EXIT_CODES
                                    and signal_name(128 + code))
        if sig or "Segmentation fault" in text:
            raise E.RunnerCrashError(
                f"executor_runner crashed ({sig or 'SIGSEGV'}) on device {serial} running "
                f"{name}: {detail or 'no log'}. A failed check aborts (SIGABRT); a large model "
                f"is often killed for memory (see `adb -s {serial} logcat -b crash`)",
                result.stdout, result.stderr)
        raise E.RunnerFailedError(
            f"executor_runner exited {code} on device {serial} running {name}: {detail}",
            result.stdout, result.stderr)

    def _line(self, text: str, artifact: Path, warmup: int) -> dict:
        parsed = out.parse_executor_runner(text)
        times = parsed["iteration_ms"]
        line = {"protocol": PROTOCOL, "status": "ok", "reason": None, "artifact": artifact.name,
                "format": "pte", "runtime": {"name": "executorch executor_runner",
                                             "runner": posixpath.basename(self.remote_runner)},
                "load_ms": parsed["load_ms"], "warmup_ms": times[:warmup],
                "iteration_ms": times[warmup:], "peak_rss_mb": parsed["peak_rss_mb"],
                "etdump": None, "etdump_skip_runs": 0, "placement": None,
                "timing_source": "runner" if times else "total"}
        if not times and parsed["total_ms"] is not None:
            line["aggregate_mean_ms"] = parsed["total_ms"] / parsed["num_executions"]
            line["note"] = ("executor_runner printed only its total: the mean includes the "
                            "warm-up executions")
        return line
