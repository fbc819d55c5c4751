"""``mobile-sd bench ARTIFACT_DIR --target host|android[:SERIAL]|ios[:UDID]|mac[:UNITS]``."""
from __future__ import annotations

import argparse
from pathlib import Path

# Users say android/host; the transports are named after how they reach the device.
TARGET_ALIASES = {"android": "adb", "host": "local"}


def normalize_target(target: str) -> str:
    kind, sep, rest = target.partition(":")
    return TARGET_ALIASES.get(kind, kind) + sep + rest


def cmd_bench(args: argparse.Namespace) -> int:
    from mobile_sd.bench import run_bench
    from mobile_sd.errors import BackendUnavailableError
    from mobile_sd.report.bench_report import render_report

    out = args.out or Path(args.artifact_dir) / "bench"
    results = run_bench(Path(args.artifact_dir), normalize_target(args.target), args.warmup,
                        args.iters, out, args.runner, timeout_s=args.timeout,
                        profile_ops=not args.no_profile)
    render_report(out / "bench.jsonl", out)
    for r in results:
        stats = r.get("stats") or {}
        line = (f"{r.get('component', '?'):13s} {r.get('status', '?'):8s} "
                + (f"median {stats['median_ms']:.1f} ms  p90 {stats['p90_ms']:.1f} ms  "
                   f"min {stats['min_ms']:.1f} ms" if stats.get("median_ms") is not None
                   else str(r.get("reason", ""))))
        print(line)
    print(f"results appended to {out / 'bench.jsonl'}; report {out / 'bench.md'}")
    failed = [r for r in results if r.get("status") == "error" or r.get("partial")]
    if failed:
        return 2
    if not any(r.get("status") == "ok" for r in results) and not args.allow_skipped:
        reasons = sorted({str(r.get("reason", "")) for r in results})
        raise BackendUnavailableError(
            f"nothing was measured on --target {args.target}: all {len(results)} runs skipped "
            f"({reasons[0].splitlines()[0] if reasons and reasons[0] else 'no runnable file'}); pass --allow-skipped to accept")
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="time exported components on host, Android (adb) or iPhone")
    p.add_argument("artifact_dir", type=Path, help="a folder written by `mobile-sd export`")
    p.add_argument("--target", default="host",
                   help="host | android[:SERIAL] | ios[:UDID] | mac[:CPU_ONLY|CPU_AND_GPU|CPU_AND_NE|ALL]")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", type=Path, default=None, help="report folder (default ARTIFACT_DIR/bench)")
    p.add_argument("--runner", type=Path, default=None,
                   help="Android: path to an executor_runner built for the device (docs/android_runner.md)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per artifact run")
    p.add_argument("--no-profile", action="store_true", help="skip the per-op ETDump pass")
    p.add_argument("--allow-skipped", action="store_true",
                   help="exit 0 even when nothing could be measured (every run skipped)")
    p.set_defaults(func=cmd_bench)
