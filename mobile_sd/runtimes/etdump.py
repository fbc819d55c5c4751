"""Per-op tables and per-run times from an ETDump, via ExecuTorch's ``Inspector``: the one
reader of ETDumps, for ``mobile-sd bench`` (:func:`op_table`, medians per event) and host
profiling (:func:`op_totals`, totals per op kind).

Works on ETDumps from the Python runtime and from ``executor_runner`` alike. Without an
ETRecord the event names are the runtime's own: XNNPACK ops ("Convolution (NHWC, F32) IGEMM
#3"), portable kernels ("native_call_mean.out") and framework events, which are kept out of
the op table because they contain the ops (``DELEGATE_CALL``) or the whole run.
"""
from __future__ import annotations

import re
import warnings
from collections import defaultdict
from pathlib import Path

#: Events that wrap other events or the whole method; not ops.
FRAMEWORK_EVENTS = {"Method::execute", "Method::init", "Program::load_method", "DELEGATE_CALL",
                    "OPERATOR_CALL"}


def _inspector(path: Path, etrecord: Path | None = None):
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
    return inspector


def _execute_events(path: Path, etrecord: Path | None = None):
    for block in _inspector(path, etrecord).event_blocks:
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

    Example (not run by the tests: it needs real artifacts)::

        op_table("unet.etdp", skip_runs=1, top=5)
        # -> [{'name': 'Convolution (NHWC, F32) IGEMM #12', 'median_ms': 41.2, ...}, ...]
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


def _row_name(event) -> str:
    name = re.sub(r" #\d+$", "", event.name)
    if name == "DELEGATE_CALL" and event.delegate_backend_name:  # named when an ETRecord is given
        return f"DELEGATE_CALL[{event.delegate_backend_name}]"
    return name


def _kind(event) -> str:
    if event.is_delegated_op:
        return "delegate_op"
    if event.name == "DELEGATE_CALL":
        return "delegate_call"
    if event.name.startswith("Method::"):
        return "method"
    return "operator"


def op_totals(path: str | Path, etrecord: str | Path | None = None) -> list[dict]:
    """Per-op totals of every ``Execute`` block, slowest total first.

    Rows: ``name`` (XNNPACK op like ``Convolution (NHWC, F32) IGEMM``, ``DELEGATE_CALL[backend]``,
    portable ``native_call_<op>.out``, or ``Method::execute``), ``kind``, ``backend``, ``count``,
    ``total_ms``, ``mean_ms``. Delegate ops are nested inside their DELEGATE_CALL, and everything
    inside Method::execute: do not sum rows of different kinds.
    """
    stats: dict[str, dict] = defaultdict(lambda: {"count": 0, "total_ms": 0.0})
    inspector = _inspector(Path(path), Path(etrecord) if etrecord else None)
    for block in inspector.event_blocks:
        if block.name != "Execute":
            continue
        for event in block.events:
            # OPERATOR_CALL wraps the native_call_* event of the same op: counted once.
            if event.name == "OPERATOR_CALL" or event.perf_data is None:
                continue
            row = stats[_row_name(event)]
            row.setdefault("kind", _kind(event))
            row.setdefault("backend", event.delegate_backend_name)
            row["count"] += len(event.perf_data.raw)
            row["total_ms"] += float(sum(event.perf_data.raw))
    rows = [{"name": name, **row, "mean_ms": row["total_ms"] / max(row["count"], 1)}
            for name, row in stats.items()]
    return sorted(rows, key=lambda r: r["total_ms"], reverse=True)
