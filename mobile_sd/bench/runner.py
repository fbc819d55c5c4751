"""The runner protocol: one artifact in, one JSON line out. Both sides live here.

Device side (``python -m mobile_sd.bench.runner`` on a host or Mac; an iOS benchmark app must
accept the same arguments and print the same line)::

    --artifact PATH          .pte | .onnx | .mlpackage / .mlmodelc
    --inputs JSON|@FILE      [{"name": "sample", "shape": [2,4,64,64], "dtype": "float32"}, ...]
    --warmup W --iters N     untimed then timed executions
    [--backend NAME]         manifest backend (xnnpack, coreml...), checked before loading
    [--data-path PATH]       .ptd weights of a .pte
    [--etdump PATH]          .pte only: one extra profiled pass written as ETDump (per-op table)
    [--compute-units UNITS]  Core ML: CPU_ONLY | CPU_AND_GPU | CPU_AND_NE | ALL
    [--threads T] [--seed S]
    --device-info            print {"protocol", "device_info"} and exit

While running it prints ``mobile-sd-iter warmup|timed I/N MS`` lines on stderr (progress, and
the partial result if it dies), then exactly one line on stdout::

    {"protocol": "mobile-sd-bench/1", "status": "ok" | "skipped" | "error", "reason": ...,
     "artifact": "unet.pte", "format": "pte", "runtime": {"name": ..., "version": ...},
     "load_ms": 812.5, "warmup_ms": [...], "iteration_ms": [...], "rss_before_load_mb": ...,
     "peak_rss_mb": ..., "etdump": PATH | null, "etdump_skip_runs": 1, "placement": {...} | null}

Exit code 0 for "ok" and "skipped" (a normal outcome), 1 for "error". Host side:
:func:`runner_args` builds the arguments, :func:`parse_result_line` / :func:`parse_progress`
read the output, :func:`drive` does push / run / pull on any transport that has
``runner_prefix()``. Heavy runtimes are imported inside the function that needs them.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable

PROTOCOL = "mobile-sd-bench/1"
ITER_PREFIX = "mobile-sd-iter"
COMPUTE_UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL")


def runner_args(artifact: str, inputs: list[dict], warmup: int, iters: int, *,
                backend: str | None = None, data_path: str | None = None,
                etdump: str | None = None, compute_units: str | None = None,
                threads: int | None = None, seed: int = 0) -> list[str]:
    """Arguments of the protocol, without the program (each transport adds its own).

    >>> runner_args("unet.pte", [{"name": "x", "shape": [1], "dtype": "float32"}], 1, 5)
    ['--artifact', 'unet.pte', '--inputs', '[{"name":"x","shape":[1],"dtype":"float32"}]', \
'--warmup', '1', '--iters', '5', '--seed', '0']
    """
    argv = ["--artifact", artifact, "--inputs", json.dumps(inputs, separators=(",", ":")),
            "--warmup", str(warmup), "--iters", str(iters), "--seed", str(seed)]
    for flag, value in (("--backend", backend), ("--data-path", data_path),
                        ("--etdump", etdump), ("--compute-units", compute_units),
                        ("--threads", threads)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def parse_result_line(stdout: str) -> dict | None:
    """The last stdout line that is a JSON object of this protocol (runtimes print noise)."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(data, dict) and data.get("protocol") == PROTOCOL:
                return data
    return None


def parse_progress(stderr: str) -> dict[str, list[float]]:
    """Iteration times from the progress lines, to keep what finished before a fault."""
    times: dict[str, list[float]] = {"warmup_ms": [], "iteration_ms": []}
    for line in stderr.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] == ITER_PREFIX:
            key = "warmup_ms" if parts[1] == "warmup" else "iteration_ms"
            times[key].append(float(parts[3]))
    return times


def drive(transport, artifact: Path, inputs: list[dict], warmup: int, iters: int, *,
          timeout_s: float, etdump_local: Path | None = None, data_file: Path | None = None,
          companions=(), on_line=None, **options) -> dict:
    """Push ``artifact``, run the protocol on ``transport``, pull the ETDump; return the line.

    ``companions`` are pushed next to the artifact (ONNX external data); ``data_file`` is a
    ``.ptd`` passed as ``--data-path``. ``options`` are :func:`runner_args` keywords (backend,
    compute_units, threads, seed).
    A runner that dies without its line raises ``RunnerCrashError`` (signal) or
    ``RunnerFailedError``, carrying its output for partial results.
    """
    from mobile_sd.bench.errors import RunnerCrashError, RunnerFailedError
    from mobile_sd.bench.transports.base import signal_name

    remote = transport.remote(artifact.name)
    etdump_remote = transport.remote(f"{artifact.stem}.etdp") if etdump_local else None
    pushed: list[str] = []
    try:
        for local in (artifact, *companions, *([data_file] if data_file else [])):
            # Companions (ONNX external data) are resolved next to the model by the runtime.
            pushed.append(transport.remote(local.name))
            transport.push(local, pushed[-1])
        argv = transport.runner_prefix() + runner_args(
            remote, inputs, warmup, iters, etdump=etdump_remote,
            data_path=pushed[-1] if data_file is not None else None, **options)
        result = transport.run(argv, timeout_s, on_line)
        line = parse_result_line(result.stdout)
        if line is None:
            sig = signal_name(result.returncode)
            tail = "\n".join([l for l in result.stderr.strip().splitlines()
                              if not l.startswith(ITER_PREFIX)][-8:])
            if sig:
                raise RunnerCrashError(
                    f"{transport.name}: the runner crashed ({sig}) on {artifact.name}; it may "
                    f"be out of memory. Last stderr lines:\n{tail}", result.stdout, result.stderr)
            raise RunnerFailedError(
                f"{transport.name}: the runner exited {result.returncode} on {artifact.name} "
                f"without a result line. Last stderr lines:\n{tail}",
                result.stdout, result.stderr)
        if etdump_local and line.get("status") == "ok" and line.get("etdump"):
            transport.pull(etdump_remote, etdump_local)
            line["etdump"] = str(etdump_local)
        return line
    finally:
        for path in pushed + ([etdump_remote] if etdump_remote else []):
            transport.remove(path)


# ----------------------------------------------------------------------------- device side
from mobile_sd.bench.inputs import load_inputs_arg, make_inputs  # noqa: E402,F401  (device side)


def _time_loop(call: Callable[[], object], warmup: int, iters: int) -> dict:
    out: dict[str, list[float]] = {"warmup_ms": [], "iteration_ms": []}
    for phase, count, key in (("warmup", warmup, "warmup_ms"), ("timed", iters, "iteration_ms")):
        for i in range(count):
            start = time.perf_counter()
            call()
            ms = (time.perf_counter() - start) * 1e3
            out[key].append(ms)
            print(f"{ITER_PREFIX} {phase} {i + 1}/{count} {ms:.4f}", file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m mobile_sd.bench.runner``; prints the JSON line."""
    args = _parser().parse_args(argv)
    if args.device_info:
        print(json.dumps({"protocol": PROTOCOL, "device_info": _device_info()}), flush=True)
        return 0
    artifact = Path(args.artifact)
    line: dict = {"protocol": PROTOCOL, "status": "ok", "reason": None,
                  "artifact": artifact.name, "format": _format_of(artifact)}
    try:
        from mobile_sd.bench.backends import bench_artifact

        line.update(bench_artifact(artifact, args, _time_loop))
    except Exception as exc:  # noqa: BLE001 - the line must say what went wrong, whatever it is
        from mobile_sd.errors import BackendUnavailableError

        skipped = isinstance(exc, BackendUnavailableError)
        line.update(status="skipped" if skipped else "error", reason=str(exc),
                    error_type=type(exc).__name__)
    print(json.dumps(line), flush=True)
    return 1 if line["status"] == "error" else 0


def _format_of(path: Path) -> str:
    return {".pte": "pte", ".onnx": "onnx", ".mlpackage": "mlpackage",
            ".mlmodelc": "mlmodelc"}.get(path.suffix, path.suffix.lstrip(".") or "unknown")


def _device_info() -> dict:
    from mobile_sd.utils.env import machine_info

    info = machine_info()
    return {"model": info["cpu"], "os": f"{info['system']} {info['release']}",
            "abi": info["machine"], "python": platform.python_version()}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mobile_sd.bench.runner",
                                description="Time one model artifact; print one JSON line.")
    p.add_argument("--device-info", action="store_true")
    p.add_argument("--artifact")
    p.add_argument("--inputs", default="[]", help="JSON list of {name, shape, dtype} or @file")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--backend")
    p.add_argument("--data-path")
    p.add_argument("--etdump")
    p.add_argument("--compute-units", choices=COMPUTE_UNITS)
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int, default=0)
    return p


if __name__ == "__main__":
    sys.exit(main())
