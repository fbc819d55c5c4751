"""``run_bench``: every runnable file of an export folder, timed on one target.

Each result is appended to ``OUT/bench.jsonl`` as soon as it exists, so a fault later in the
run (or a Ctrl-C) never loses what was measured. A fault during a run keeps the iterations that
finished, marked ``partial: true``; once the device is lost, the remaining components are
recorded as errors ("not run") instead of being attempted. Apple targets off macOS record every
component as ``skipped`` with the reason; nothing is ever reported as measured that was not.
"""
from __future__ import annotations

import uuid
from datetime import datetime, timezone
from pathlib import Path

from mobile_sd.bench.manifest import BenchItem, bench_items, load_manifest, pipeline
from mobile_sd.bench.results import SCHEMA, make_result
from mobile_sd.bench.transports import Target, open_transport, parse_target
from mobile_sd.errors import BackendUnavailableError, DeviceError, InvalidArgumentError

#: Why a target does not run a format (checked before anything is pushed).
UNSUPPORTED = {
    ("adb", "onnx"): "the adb target runs ExecuTorch .pte files with executor_runner only",
    ("ios", "onnx"): "the iOS benchmark app runs .pte and Core ML models only",
    ("ios", "qnn_context"): "QNN context binaries run on Snapdragon (Android) phones only",
    ("mac", "qnn_context"): "QNN context binaries run on Snapdragon (Android) phones only",
    ("local", "qnn_context"): ("QNN context binaries run on a Snapdragon phone (--target adb "
                               "--runner onnxruntime_perf_test); on this host only the HTP "
                               "emulator runs them (mobile-sd parity), which is no speed measure"),
}


def run_bench(artifact_dir: Path, target: str, warmup: int, iters: int, out_dir: Path,
              runner: Path | None = None, *, timeout_s: float = 1800.0,
              profile_ops: bool = True) -> list[dict]:
    """Benchmark ``artifact_dir`` on ``target``; return this run's result records.

    ``target``: ``local``, ``adb[:SERIAL]``, ``ios[:UDID]``, ``mac[:UNITS]``. ``runner``: the
    Android ``executor_runner`` (required for adb). ``timeout_s`` bounds one artifact's run.
    ``profile_ops`` collects an ETDump per ``.pte`` for the per-op table. Results go to
    ``out_dir/bench.jsonl`` (``mobile_sd.report.bench_report`` renders them).

    Example (not run by the tests: it needs real artifacts)::

        run_bench(Path("out/snapfusion-xnnpack"), "local", 2, 10, Path("bench"))
        # -> [{'component': 'text_encoder', 'status': 'ok', 'stats': {'median_ms': 41.3, ...}}, ...]
    """
    if warmup < 0 or iters < 1:
        raise InvalidArgumentError(f"need warmup >= 0 and iters >= 1, got {warmup} and {iters}")
    artifact_dir, out_dir = Path(artifact_dir), Path(out_dir)
    manifest = load_manifest(artifact_dir)
    items, pipe = bench_items(manifest, artifact_dir), pipeline(manifest)
    tgt = parse_target(target)
    if tgt.kind == "adb" and runner is None:
        raise InvalidArgumentError("--target adb needs --runner PATH to an executor_runner built "
                                   "for Android (see docs/android_runner.md), or for format "
                                   "'qnn' an onnxruntime_perf_test (see docs/qnn_htp.md)")
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = _context(manifest, artifact_dir, pipe, tgt, warmup, iters)
    try:
        transport = open_transport(tgt)
    except BackendUnavailableError as exc:
        results = [make_result(ctx, it, status="skipped", reason=str(exc)) for it in items]
        return _finish(results, out_dir)
    results: list[dict] = []
    try:
        ctx["device"] = transport.device_info()
        driver = _driver(tgt, transport, runner, manifest)
        lost = None
        for item in items:
            if lost is not None:
                result = make_result(ctx, item, status="error", reason=f"not run: {lost}")
            else:
                result = _bench_item(ctx, item, tgt, transport, driver, out_dir, timeout_s,
                                     profile_ops)
                if result["error"] and result["error"]["type"] in ("DeviceLostError",
                                                                   "DeviceNotFoundError"):
                    lost = result["error"]["message"]
            _append(out_dir, result)
            results.append(result)
    finally:
        transport.close()
    return _finish(results, out_dir, appended=True)


def _bench_item(ctx, item: BenchItem, tgt: Target, transport, driver, out_dir: Path,
                timeout_s: float, profile_ops: bool) -> dict:
    reason = UNSUPPORTED.get((tgt.kind, item.format))
    coreml = item.format in ("mlpackage", "mlmodelc") or (
        item.format == "pte" and (item.backend or "").lower() == "coreml")
    if coreml and tgt.kind == "adb":
        reason = "Core ML (and a Core ML-delegated .pte) runs only on Apple devices"
    elif coreml and tgt.kind == "local":
        try:
            from mobile_sd.bench.transports.ios import require_macos

            require_macos(f"Core ML ({item.path.name})")
        except BackendUnavailableError as exc:
            reason = str(exc)
    if reason:
        return make_result(ctx, item, status="skipped", reason=reason)
    sha = item.sha256  # verified with the whole folder when the manifest was loaded
    etdump = None
    if profile_ops and item.format == "pte":
        etdump = out_dir / "etdump" / f"{item.component}-{item.path.stem}-{_slug(tgt)}.etdp"
        etdump.parent.mkdir(parents=True, exist_ok=True)
    with _progress(item, ctx["warmup"] + ctx["iters"]) as on_line:
        try:
            if driver is not None:
                line = driver.bench(item.path, ctx["warmup"], ctx["iters"], timeout_s=timeout_s,
                                    etdump_local=etdump, data_file=item.data_file,
                                    on_line=on_line, **({"companions": item.companions}
                                                        if item.format == "qnn_context" else {}))
            else:
                from mobile_sd.bench.runner import drive

                line = drive(transport, item.path, item.inputs, ctx["warmup"], ctx["iters"],
                             timeout_s=timeout_s, etdump_local=etdump,
                             data_file=item.data_file, companions=item.companions,
                             on_line=on_line, backend=item.backend,
                             compute_units=tgt.compute_units)
        except DeviceError as exc:
            return make_result(ctx, item, line=_partial(exc), sha256=sha, status="error",
                               error=exc, reason=str(exc))
    return make_result(ctx, item, line=line, sha256=sha)


def _partial(exc: Exception) -> dict | None:
    """Iterations that finished before ``exc``, from the driver or the runner's progress."""
    partial = getattr(exc, "partial", None)
    if partial is None and getattr(exc, "stderr", None):
        from mobile_sd.bench.runner import parse_progress

        partial = parse_progress(exc.stderr)
    return partial if partial and partial.get("iteration_ms") else None


def _driver(tgt: Target, transport, runner: Path | None, manifest=None):
    if tgt.kind != "adb":
        return None
    if manifest is not None and manifest.format == "qnn":
        from mobile_sd.bench.transports.ort_perf_test import OrtPerfTestDriver

        comp = next(iter(manifest.components.values())).details
        return OrtPerfTestDriver(transport, Path(runner), int(comp["soc_model"]),
                                 int(str(comp["htp_arch"]).lstrip("v")))
    from mobile_sd.bench.transports.executor_runner import ExecutorRunnerDriver

    return ExecutorRunnerDriver(transport, Path(runner))


class _progress:
    """tqdm over warm-up + timed iterations, fed by the runner's lines as they come."""

    def __init__(self, item: BenchItem, total: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=f"{item.component} {item.path.name}", unit="it",
                        leave=False, disable=None)

    def __enter__(self):
        from mobile_sd.bench.runner import ITER_PREFIX

        def on_line(_stream: str, line: str) -> None:
            if line.startswith(ITER_PREFIX) or "] Iteration " in line:
                self.bar.update(1)
        return on_line

    def __exit__(self, *exc) -> None:
        self.bar.close()


def _context(manifest, artifact_dir: Path, pipe, tgt: Target, warmup: int,
             iters: int) -> dict:
    from mobile_sd.utils.env import git_sha, machine_info, tool_versions

    return {"schema": SCHEMA, "run_id": uuid.uuid4().hex[:12],
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "target": str(tgt), "device": None, "host": machine_info(),
            "versions": tool_versions(), "git_sha": git_sha(),
            "export_git_sha": manifest.git_sha, "recipe": manifest.recipe,
            "pipeline": pipe, "artifact_dir": _shown(artifact_dir),
            "warmup": warmup, "iters": iters}


def _slug(tgt: Target) -> str:
    return str(tgt).replace(":", "-").replace("/", "-")


def _append(out_dir: Path, result: dict) -> None:
    from mobile_sd.bench.results import append_results

    append_results(out_dir / "bench.jsonl", [result])


def _finish(results: list[dict], out_dir: Path, appended: bool = False):
    if not appended:
        from mobile_sd.bench.results import append_results

        append_results(out_dir / "bench.jsonl", results)
    return results


def _shown(path: Path) -> str:
    """The artifact folder as reports show it: relative to the working folder when inside it,
    so a committed report names no machine path."""
    resolved = path.resolve()
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(resolved)
