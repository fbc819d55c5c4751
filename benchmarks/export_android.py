"""Full-size ExecuTorch / ONNX exports: `make export-android` and the folders host_latency uses.

Usage: ``.venv/bin/python benchmarks/export_android.py [--spec snapfusion]
[--recipes fp32 int8 onnx]``. Writes ``benchmarks/results/export_android.{json,md}``.

Each export is ``mobile-sd export`` in its own process under ``/usr/bin/time -v`` (Debian's
``time`` package): wall time and peak RSS of exactly what a user runs. ``fp32`` is
`make export-android`'s command (``android-snapfusion-xnnpack-fp32.yaml`` into
``artifacts/android``), checked against its bar (<= 10 min, <= 12 GB). ``int8`` (calibrated on
the reference pipeline, with the sensitivity-chosen fp32 fallback) and ``onnx`` write
``artifacts/android-int8`` and ``artifacts/onnx``, which ``benchmarks/host_latency.py`` reuses.
The machine is shared: the load average around each run is recorded. One full-size job at a time.
"""
from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

import _common  # noqa: F401  (sets sys.path)
from _common import RESULTS, ROOT, git_sha, timed_export, write_results

RUNS = {"fp32": ("android-snapfusion-xnnpack-fp32", "android"),
        "int8": ("android-snapfusion-xnnpack-int8", "android-int8"),
        "onnx": ("onnx-snapfusion", "onnx")}
BAR_SECONDS, BAR_RSS_GB = 600, 12.0
COMPONENTS = ("text_encoder", "unet", "decoder")


def _mb(entry: dict, roles: tuple[str, ...]) -> float:
    return round(sum(f["bytes"] for f in entry["files"] if f.get("role") in roles) / 2**20, 1)


def summarize(kind: str, run: dict) -> dict:
    """One row: timings, per-component deployable size (program + weights) and partitions."""
    comps = run.pop("manifest")["components"]
    row = {"run": kind, "recipe": RUNS[kind][0], **run}
    for name in COMPONENTS:
        entry = comps[name]
        row[f"{name}_mb"] = _mb(entry, ("model", "weights", "external_data"))
        row[f"{name}_s"] = entry.get("export_seconds")
        delegation = entry.get("delegation") or {}
        row[f"{name}_partitions"] = delegation.get("num_partitions")
    row["etrecord_mb"] = round(sum(_mb(comps[n], ("etrecord",)) for n in COMPONENTS), 1)
    if kind == "fp32":
        row["bar"] = ("met" if row["wall_s"] <= BAR_SECONDS and row["peak_rss_gb"] <= BAR_RSS_GB
                      else "NOT met")
    return row


def previous_rows(runs: list[str]) -> list[dict]:
    """Rows of earlier runs of the recipes not rerun now (each row carries its date and sha)."""
    path = RESULTS / "export_android.json"
    if not path.is_file():
        return []
    return [r for r in json.loads(path.read_text())["rows"] if r["run"] not in runs]


COLUMNS = [("run", "run"), ("wall_s", "wall s"), ("cpu_s", "CPU s"),
           ("peak_rss_gb", "peak RSS GB"), ("bar", "bar (<=600 s, <=12 GB)"),
           ("text_encoder_mb", "text enc MB"), ("unet_mb", "UNet MB"), ("decoder_mb", "decoder MB"),
           ("unet_s", "UNet export s"), ("unet_partitions", "UNet partitions"),
           ("etrecord_mb", "ETRecords MB"), ("load_before", "load before"),
           ("load_after", "load after"), ("date", "date"), ("git_sha", "git")]


def write(rows: list[dict], spec: str) -> None:
    order = {kind: i for i, kind in enumerate(RUNS)}
    rows = sorted(rows, key=lambda r: order[r["run"]])
    write_results("export_android", rows, COLUMNS,
                  f"ExecuTorch / ONNX export, full-size {spec} (seeded random weights)", [
                      "fp32 = `make export-android` (XNNPACK fp32, CFG folded, weights in .ptd, "
                      ".bpte with reference I/O, graph-only ETRecords).",
                      "int8 = static PT2E int8 calibrated on the reference pipeline (2 prompts x "
                      "8 steps, CFG folded), measured fp32 fallback; text encoder int8 dynamic. "
                      "onnx = fp32 ONNX (onnxsim skipped for the 2.9 GB UNet: over protobuf's "
                      "2 GB limit).",
                      "Sizes are what a device loads: program + weights (.pte + .ptd, .onnx + "
                      "external data); .bpte and ETRecords are for verification and profiling.",
                      "Each row carries the date and git sha of its own run (rerun one recipe "
                      "with --recipes; the other rows are kept).",
                      "Commands: " + "; ".join(f"`{r['command']}`" for r in rows)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--spec", default="snapfusion")
    p.add_argument("--recipes", nargs="+", default=list(RUNS), choices=list(RUNS))
    args = p.parse_args()
    rows = previous_rows(args.recipes)
    for kind in args.recipes:
        recipe, folder = RUNS[kind]
        run = timed_export(ROOT / "export_recipes" / f"{recipe}.yaml", args.spec,
                           ROOT / "artifacts" / folder)
        rows.append({**summarize(kind, run), "git_sha": str(git_sha(ROOT))[:10],
                     "date": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        print(json.dumps(rows[-1]), flush=True)
        write(rows, args.spec)   # after each run: a later failure keeps the earlier rows


if __name__ == "__main__":
    main()
