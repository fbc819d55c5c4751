"""Drive onnxruntime's ``onnxruntime_perf_test`` with the QNN EP on an Android phone: the device
path of ``format: qnn`` exports (EPContext wrapper ``.onnx`` + ``_qnn.bin``).

``--runner`` is the ``onnxruntime_perf_test`` of an onnxruntime Android build with the QNN EP
(``--use_qnn``), or a stock one with the QNN EP plugin ``libonnxruntime_providers_qnn.so`` beside
it (onnxruntime-qnn 2.x, the package that compiled the export; see docs/qnn_htp.md); every ``*.so`` in its folder (``libonnxruntime.so``, the QNN
EP library when built shared, and QAIRT's ``libQnnHtp.so``, ``libQnnSystem.so``,
``libQnnHtpV<arch>Stub.so`` from ``lib/aarch64-android`` and ``libQnnHtpV<arch>Skel.so`` from
``lib/hexagon-v<arch>/unsigned``) is pushed beside it once per session. The binary runs with
``LD_LIBRARY_PATH`` and ``ADSP_LIBRARY_PATH`` (where the DSP loader finds the Skel) set to the
work folder.

Flags (``onnxruntime/test/perftest/command_args_parser.cc``): ``-e qnn``, or for the plugin
``--plugin_ep_libs "QNNExecutionProvider|<lib>" --plugin_eps QNNExecutionProvider
--plugin_ep_options "backend_type|htp ..."``; ``-i "backend_path|
libQnnHtp.so htp_performance_mode|burst soc_model|57 htp_arch|75"`` (EP options), ``-C
"session.disable_cpu_ep_fallback|1"`` (session config: every node on the HTP, as exported),
``-m times -r N`` (N timed runs), ``-I`` (generate the input bindings: random data of the
model's static shapes). Output (``performance_runner.cc``): "Session creation time cost: S s",
"First inference time cost: N ms" (the warm-up run), "Average inference time cost: X ms",
"Min/Max/P50/P90/P95/P99 Latency: S s", "Peak working set size: B bytes". It prints no
per-iteration times, so results carry its aggregates (``timing_source: "perf_test"``).
"""
from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mobile_sd.bench import errors as E
from mobile_sd.bench.runner import PROTOCOL

REMOTE_NAME = "onnxruntime_perf_test"
NEEDED_LIBS = ("libQnnHtp.so", "libQnnSystem.so")   # plus the arch's Stub + Skel (below)
PLUGIN_LIB, PLUGIN_EP = "libonnxruntime_providers_qnn.so", "QNNExecutionProvider"

_NUMBER = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
_FIELDS = {"load_s": "Session creation time cost", "first_ms": "First inference time cost",
           "mean_ms": "Average inference time cost", "requests": "Total inference requests",
           "peak_bytes": "Peak working set size", "min_s": "Min Latency", "max_s": "Max Latency",
           "p50_s": "P50 Latency", "p90_s": "P90 Latency", "p95_s": "P95 Latency",
           "p99_s": "P99 Latency"}


def arch_libs(htp_arch: int) -> tuple[str, ...]:
    """The QAIRT libraries the HTP of one Hexagon generation needs on the phone."""
    return NEEDED_LIBS + (f"libQnnHtpV{htp_arch}Stub.so", f"libQnnHtpV{htp_arch}Skel.so")


def perf_test_argv(runner: str, model: str, iters: int, soc_model: int, htp_arch: int,
                   workdir: str, plugin: str | None = None) -> list[str]:
    """The remote command line. ``plugin``: the QNN EP as a plugin library (the
    ``libonnxruntime_providers_qnn.so`` of onnxruntime-qnn 2.x, as on this host) registered with
    ``--plugin_ep_libs``; otherwise the QNN EP built into onnxruntime (``-e qnn``).

    >>> perf_test_argv("./onnxruntime_perf_test", "unet.onnx", 10, 57, 75, "/data/local/tmp/m")
    ... # doctest: +NORMALIZE_WHITESPACE
    ['env', 'LD_LIBRARY_PATH=/data/local/tmp/m', 'ADSP_LIBRARY_PATH=/data/local/tmp/m',
     './onnxruntime_perf_test', '-e', 'qnn', '-i',
     'backend_path|libQnnHtp.so htp_performance_mode|burst soc_model|57 htp_arch|75',
     '-C', 'session.disable_cpu_ep_fallback|1', '-m', 'times', '-r', '10', '-I', 'unet.onnx']
    """
    common = f"htp_performance_mode|burst soc_model|{soc_model} htp_arch|{htp_arch}"
    if plugin:
        ep = ["--plugin_ep_libs", f"{PLUGIN_EP}|{plugin}", "--plugin_eps", PLUGIN_EP,
              "--plugin_ep_options", f"backend_type|htp {common}"]
    else:
        ep = ["-e", "qnn", "-i", f"backend_path|libQnnHtp.so {common}"]
    return ["env", f"LD_LIBRARY_PATH={workdir}", f"ADSP_LIBRARY_PATH={workdir}", runner, *ep,
            "-C", "session.disable_cpu_ep_fallback|1", "-m", "times", "-r", str(iters), "-I",
            model]


def parse_perf_test(text: str) -> dict:
    """The numbers ``onnxruntime_perf_test`` printed (ms / MB; None for a missing line)."""
    found = {}
    for key, label in _FIELDS.items():
        match = re.search(rf"^\s*{re.escape(label)}(?: total)?:\s*{_NUMBER}", text, re.M)
        found[key] = float(match.group(1)) if match else None
    ms = lambda s: None if s is None else s * 1e3  # noqa: E731
    return {"load_ms": ms(found["load_s"]), "first_ms": found["first_ms"],
            "mean_ms": found["mean_ms"],
            "requests": int(found["requests"]) if found["requests"] is not None else None,
            "peak_rss_mb": None if found["peak_bytes"] is None else found["peak_bytes"] / 2**20,
            **{k.replace("_s", "_ms"): ms(found[k]) for k in
               ("min_s", "max_s", "p50_s", "p90_s", "p95_s", "p99_s")}}


class OrtPerfTestDriver:
    """Pushes ``onnxruntime_perf_test`` + the QNN libraries once, then times context binaries.

    ``soc_model`` / ``htp_arch`` come from the export's manifest (the SoC it was compiled for).
    """

    def __init__(self, transport, runner: Path, soc_model: int, htp_arch: int) -> None:
        runner = Path(runner)
        if not runner.is_file():
            raise E.ArtifactMissingOnDeviceError(
                f"--runner {runner} does not exist: build onnxruntime_perf_test for Android with "
                "the QNN EP as in docs/qnn_htp.md and pass its path")
        libs = {p.name: p for p in runner.parent.glob("*.so")}
        missing = [n for n in arch_libs(htp_arch) if n not in libs]
        if missing:
            raise E.ArtifactMissingOnDeviceError(
                f"{runner.parent} lacks {', '.join(missing)}: copy them from QAIRT "
                f"(lib/aarch64-android, lib/hexagon-v{htp_arch}/unsigned) beside "
                f"{runner.name} (see docs/qnn_htp.md)")
        self.transport, self.runner, self.libs = transport, runner, sorted(libs.values())
        self.soc_model, self.htp_arch = soc_model, htp_arch
        self.remote_runner = transport.remote(REMOTE_NAME)
        self.plugin = transport.remote(PLUGIN_LIB) if PLUGIN_LIB in libs else None
        self._ready = False

    def _prepare(self) -> None:
        if self._ready:
            return
        t = self.transport
        t.push(self.runner, self.remote_runner)
        for lib in self.libs:
            t.push(lib, t.remote(lib.name))
        t._call(t.shell_argv(f"chmod 755 {self.remote_runner}"), "push")
        self._ready = True

    def bench(self, artifact: Path, warmup: int, iters: int, *, timeout_s: float,
              companions=(), on_line=None, **_unused) -> dict:
        """Run one context binary: ``artifact`` (the wrapper) with its ``companions`` (.bin)."""
        self._prepare()
        t = self.transport
        pushed = [t.remote(artifact.name)] + [t.remote(Path(c).name) for c in companions]
        argv = perf_test_argv(self.remote_runner, pushed[0], iters, self.soc_model,
                              self.htp_arch, t.workdir, self.plugin)
        try:
            for local, remote in zip([artifact, *companions], pushed):
                t.push(local, remote)
            result = t.run(argv, timeout_s, on_line)
            text = result.stdout + result.stderr
            if result.returncode != 0:
                errors = [l for l in text.splitlines() if "rror" in l][-3:]
                raise E.RunnerFailedError(
                    f"onnxruntime_perf_test exited {result.returncode} on device "
                    f"{t.serial} running {artifact.name}: "
                    f"{' | '.join(errors or text.strip().splitlines()[-3:]) or 'no log'}",
                    result.stdout, result.stderr)
            return self._line(parse_perf_test(text), artifact, warmup)
        finally:
            for path in pushed:
                try:
                    t.remove(path)
                except E.DeviceError:
                    pass  # the device is gone; the original fault is what matters

    def _line(self, parsed: dict, artifact: Path, warmup: int) -> dict:
        return {"protocol": PROTOCOL, "status": "ok", "reason": None, "artifact": artifact.name,
                "format": "qnn_context",
                "runtime": {"name": "onnxruntime_perf_test qnn",
                            "runner": posixpath.basename(self.remote_runner),
                            "soc_model": self.soc_model, "htp_arch": self.htp_arch},
                "load_ms": parsed["load_ms"],
                "warmup_ms": [parsed["first_ms"]] if parsed["first_ms"] is not None else [],
                "iteration_ms": [], "aggregate_mean_ms": parsed["mean_ms"],
                "aggregate": {k: parsed[k] for k in ("requests", "min_ms", "max_ms", "p50_ms",
                                                     "p90_ms", "p95_ms", "p99_ms")},
                "peak_rss_mb": parsed["peak_rss_mb"], "etdump": None, "etdump_skip_runs": 0,
                "placement": None, "timing_source": "perf_test",
                "note": ("onnxruntime_perf_test prints aggregates only (its first run is the "
                         "warm-up); it always runs one warm-up" if warmup != 1 else None)}
