"""One benchmark result record: what was run, where, with what, and what it measured.

Records are plain JSON (one line each in ``bench.jsonl``) so reports are rendered from data,
never typed by hand. ``status`` is ``ok`` (measured), ``skipped`` (not runnable on this target;
``reason`` says why) or ``error`` (a fault; ``partial: true`` when some timed iterations
finished before it and are kept in ``iteration_ms``).
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from mobile_sd.errors import InvalidArgumentError

SCHEMA = "mobile-sd/bench-result/v1"

#: Context keys copied into every record (see ``harness._context``).
CONTEXT_KEYS = ("schema", "run_id", "started", "target", "device", "host", "versions",
                "git_sha", "export_git_sha", "recipe", "pipeline", "artifact_dir", "warmup",
                "iters")


def make_result(ctx: dict, item, *, line: dict | None = None, sha256: str | None = None,
                status: str | None = None, reason: str | None = None,
                error: Exception | None = None) -> dict:
    """A result record for ``item`` (a ``BenchItem``) from a runner ``line``, if any."""
    from mobile_sd.bench.stats import summarize

    line = line or {}
    times = list(line.get("iteration_ms") or [])
    status = status or line.get("status") or "error"
    record = {key: ctx.get(key) for key in CONTEXT_KEYS}
    record.update({
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "component": item.component, "file": item.path.name, "format": item.format,
        "backend": item.backend, "batch": batch_of(item.inputs),
        "inputs": item.inputs, "artifact_sha256": sha256 or item.sha256,
        "status": status,
        "reason": reason or line.get("reason") or (str(error) if error is not None else None),
        "partial": bool(error is not None and times),
        "error": _error(error, line),
        "runtime": line.get("runtime"), "load_ms": line.get("load_ms"),
        "warmup_ms": line.get("warmup_ms") or [], "iteration_ms": times,
        "stats": summarize(times), "timing_source": line.get("timing_source", "runner"),
        "aggregate_mean_ms": line.get("aggregate_mean_ms"), "note": line.get("note"),
        "aggregate": line.get("aggregate"),   # runners that print only min/max/percentiles
        "rss_before_load_mb": line.get("rss_before_load_mb"),
        "peak_rss_mb": line.get("peak_rss_mb"), "placement": line.get("placement"),
        "etdump": line.get("etdump"), "op_table": None,
    })
    if record["etdump"] and status == "ok":
        record["op_table"], record["op_table_error"] = _op_table(record, line, item)
    return record


def _error(error: Exception | None, line: dict) -> dict | None:
    if error is not None:
        return {"type": type(error).__name__, "message": str(error)}
    if line.get("status") == "error":
        return {"type": line.get("error_type", "RunnerError"), "message": line.get("reason")}
    return None


def _op_table(record: dict, line: dict, item) -> tuple[list | None, str | None]:
    from mobile_sd.runtimes.etdump import op_table

    try:
        return op_table(record["etdump"], line.get("etdump_skip_runs", 0), top=20,
                        etrecord=getattr(item, "etrecord", None)), None
    except Exception as exc:  # noqa: BLE001 - a damaged ETDump must not lose the timings
        return None, f"{type(exc).__name__}: {exc}"


def batch_of(inputs: list) -> int:
    """Leading dimension of the first non-scalar input (what the budget calls "batch")."""
    return next((int(e["shape"][0]) for e in inputs if e.get("shape")), 1)


def append_results(path: str | Path, results: list[dict]) -> None:
    """Append records to a JSON-lines file (created with its folder if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        for record in results:
            handle.write(json.dumps(record, default=str) + "\n")


def load_results(path: str | Path) -> tuple[list[dict], int]:
    """Records of a JSON-lines file, and how many lines were unreadable (a killed writer)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"{path}: no benchmark results; run `mobile-sd bench` first")
    records, bad = [], 0
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    return records, bad
