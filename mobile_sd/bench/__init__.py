"""Latency harness: time exported components on this machine, an Android phone (adb +
ExecuTorch ``executor_runner``), an iPhone (``xcrun devicectl`` + benchmark app) or Core ML
on a Mac, with one runner protocol, typed device faults, stats, the SnapFusion budget and a
report rendered from JSON-lines data.

Example (not run by the tests: it needs real artifacts)::

    from mobile_sd.bench import run_bench
    results = run_bench(Path("out/snapfusion-xnnpack"), "adb:R5CT32ABCDE", warmup=2, iters=10,
                        out_dir=Path("bench"), runner=Path("cmake-android-out/executor_runner"))

Public API: :func:`run_bench`; :mod:`~mobile_sd.bench.runner` (protocol), ``transports``
(``parse_target``, ``open_transport``, ``Transport``), :mod:`~mobile_sd.bench.stats`,
:mod:`~mobile_sd.bench.budget`, :mod:`~mobile_sd.bench.errors`. Importing this package imports
no runtime (torch, executorch, onnxruntime, coremltools).
"""
from __future__ import annotations

from mobile_sd.bench.harness import run_bench

__all__ = ["run_bench"]
