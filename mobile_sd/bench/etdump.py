"""Per-op tables and per-run times from an ETDump, via ExecuTorch's ``Inspector``.

Works on ETDumps from the Python runtime and from ``executor_runner`` alike. Without an
ETRecord the event names are the runtime's own: XNNPACK ops ("Convolution (NHWC, F32) IGEMM
#3"), portable kernels ("native_call_mean.out") and framework events, which are kept out of
the op table because they contain the ops (``DELEGATE_CALL``) or the whole run.
"""
from __future__ import annotations

import warnings
from pathlib import Path

#: Events that wrap other events or the whole method; not ops.
FRAMEWORK_EVENTS = {"Method::execute", "Method::init", "Program::load_method", "DELEGATE_CALL",
                    "OPERATOR_CALL"}


def _execute_events(path: Path, etrecord: Path | None = None):
    from executorch.devtools import Inspector

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Output Buffer not found": we want timings only
        try:
            inspector = Inspector(etdump_path=str(path),
                                  etrecord=str(etrecord) if etrecord else None)
        except Exception:  # noqa: BLE001 - a stale ETRecord must not cost the op table
            if etrecord is None:
                raise
            inspector = Inspector(etdump_path=str(path))
    for block in inspector.event_blocks:
        for event in block.events:
            if event.perf_data is not None:
                yield event.name, list(event.perf_data.raw)


def run_times_ms(path: str | Path, skip_runs: int = 0) -> list[float]:
    """Durations of each ``Method::execute`` in the ETDump, minus the first ``skip_runs``."""
    for name, raw in _execute_events(Path(path)):
        if name == "Method::execute":
            return [float(t) for t in raw[skip_runs:]]
    return []


def op_table(path: str | Path, skip_runs: int = 0, top: int | None = 20,
             etrecord: str | Path | None = None) -> list[dict]:
    """Ops by median time over the kept runs, slowest first, with their share of the total.

    Rows: ``{"name", "median_ms", "mean_ms", "runs", "share"}``; ``share`` is of the summed op
    medians (ops outside any delegate or kernel event do not count). An ``etrecord`` from the
    export lets the Inspector relate events to graph nodes; it is optional.

    >>> op_table("unet.etdp", skip_runs=1, top=5)           # doctest: +SKIP
    [{'name': 'Convolution (NHWC, F32) IGEMM #12', 'median_ms': 41.2, ...}, ...]
    """
    import numpy as np

    rows = []
    for name, raw in _execute_events(Path(path), Path(etrecord) if etrecord else None):
        kept = raw[skip_runs:] or raw
        if name in FRAMEWORK_EVENTS or not kept:
            continue
        rows.append({"name": name, "median_ms": float(np.median(kept)),
                     "mean_ms": float(np.mean(kept)), "runs": len(kept)})
    total = sum(r["median_ms"] for r in rows) or 1.0
    for row in rows:
        row["share"] = row["median_ms"] / total
    rows.sort(key=lambda r: r["median_ms"], reverse=True)
    return rows[:top] if top else rows
