"""QNN HTP context-binary exports (``format: qnn``): time, peak RSS, sizes; emulator parity.

Usage: ``python benchmarks/qnn_export.py [--spec snapfusion] [--latent-size N] [--all-socs]
[--precisions fp16 w8a16] [--parity] [--results DIR]``. Writes ``DIR/qnn_export.{json,md}``
(default ``benchmarks/results``).

Each export is ``mobile-sd export`` in its own process under ``/usr/bin/time -v`` (Debian's
``time``), one at a time: wall time and peak RSS of what a user runs. Default SoC SM8650;
``--all-socs`` adds SM8550 and SM8750. Bar: the full-size w8a16 export of all three components
<= 20 min and <= 12 GB. ``--parity``: one timed call per component in the HTP emulator (the time
is written down: ~10-40 s/GMAC, tens of minutes for a full-size UNet), then ``mobile-sd parity``
per component (no end-to-end run) when one call took <= ``--parity-max-call-s``.
The machine is shared: the load average around each run is recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import _common  # noqa: F401  (sets sys.path)
from _common import RESULTS, ROOT, provenance, render_markdown

RECIPES = {"fp16": "android-snapfusion-qnn-fp16", "w8a16": "android-snapfusion-qnn-w8a16"}
SOCS = ("SM8550", "SM8650", "SM8750")
BAR_SECONDS, BAR_RSS_GB = 1200, 12.0
COMPONENTS = ("text_encoder", "unet", "decoder")


def _mobile_sd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mobile_sd", *args]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}


def timed_export(recipe: str, soc: str, spec: str, out: Path, latent: int | None) -> dict:
    """``mobile-sd export --soc`` under ``/usr/bin/time -v`` (``_common.timed_export``)."""
    extra = ["--soc", soc] + (["--latent-size", str(latent)] if latent else [])
    return _common.timed_export(ROOT / "export_recipes" / f"{recipe}.yaml", spec, out, extra)


def one_call_seconds(folder: Path, name: str) -> float:
    """Seconds of one emulator call of ``name`` (after its session is open), one thread."""
    import torch

    from mobile_sd.manifest import load_manifest
    from mobile_sd.runtimes.component import open_component

    torch.set_num_threads(1)
    manifest = load_manifest(folder)
    runner = open_component(folder, manifest, name, num_threads=1)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, 1000, s.shape, generator=gen) if s.dtype.startswith("int")
              else torch.rand(s.shape, generator=gen) * 999 if s.name == "timestep"
              else torch.randn(s.shape, generator=gen) for s in runner.inputs]
    start = time.perf_counter()
    runner(*inputs)
    return round(time.perf_counter() - start, 2)


def parity_psnr(folder: Path, spec: str, name: str, out: Path) -> float | None:
    """fp32-tier worst PSNR of one component from ``mobile-sd parity`` (1 random input)."""
    subprocess.run(_mobile_sd("parity", str(folder), "--spec", spec, "--quiet", "--no-e2e",
                              "--no-locate", "--random-inputs", "1", "--threads", "1",
                              "--components", name, "--out", str(out)),
                   capture_output=True, text=True, cwd=ROOT, env=_env())
    report = out / "parity.json"
    if not report.is_file():
        return None
    comp = json.loads(report.read_text())["components"].get(name, {})
    worst = comp.get("tiers", {}).get("fp32", {}).get("worst") or {}
    return round(worst["psnr_db"], 1) if "psnr_db" in worst else None


def summarize(precision: str, soc: str, run: dict, full_size: bool = True) -> dict:
    comps = run.pop("manifest")["components"]
    row = {"precision": precision, "soc": soc, **run}
    for name in COMPONENTS:
        entry = comps[name]
        row[f"{name}_mb"] = round(sum(f["bytes"] for f in entry["files"]) / 2**20, 2)
        row[f"{name}_s"] = entry.get("export_seconds")
        row[f"{name}_htp_nodes"] = (entry.get("htp") or {}).get("htp_nodes")
    if precision == "w8a16" and not full_size:
        row["bar"] = "n/a (not full size)"
    elif precision == "w8a16":
        row["bar"] = ("met" if row["wall_s"] <= BAR_SECONDS and row["peak_rss_gb"] <= BAR_RSS_GB
                      else "NOT met")
    return row


COLUMNS = [("precision", "precision"), ("soc", "SoC"), ("wall_s", "wall s"), ("cpu_s", "CPU s"),
           ("peak_rss_gb", "peak RSS GB"), ("bar", "bar (w8a16 <=1200 s, <=12 GB)"),
           ("text_encoder_mb", "text enc MB"), ("unet_mb", "UNet MB"),
           ("decoder_mb", "decoder MB"), ("unet_s", "UNet export s"),
           ("unet_htp_nodes", "UNet HTP nodes"),
           *((f"{n}_call_s", f"{n} emulator call s") for n in COMPONENTS),
           *((f"{n}_psnr_db", f"{n} PSNR dB") for n in COMPONENTS),
           ("load_before", "load before"), ("load_after", "load after")]


def write(rows: list[dict], args, results: Path) -> Path:
    data = {"benchmark": "qnn_export", **provenance(), "spec": args.spec,
            "latent_size": args.latent_size, "rows": rows}
    results.mkdir(parents=True, exist_ok=True)
    path = results / "qnn_export.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    size = f", latent {args.latent_size}" if args.latent_size else ""
    (results / "qnn_export.md").write_text(render_markdown(
        data, COLUMNS, f"QNN HTP context-binary export, {args.spec}{size} (seeded random weights)",
        ["Sizes: the EPContext wrapper .onnx + the QNN context binary per component.",
         "Emulator call s: one call in QAIRT 2.51's x86_64 HTP emulator (onnxruntime-qnn 2.7.0), "
         "not a device latency; PSNR: `mobile-sd parity` fp32 tier, 1 random input, no e2e.",
         "Bar applies to the full-size w8a16 export of all three components.",
         "Commands: " + "; ".join(f"`{r['command']}`" for r in rows)]))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--spec", default="snapfusion")
    p.add_argument("--latent-size", type=int, default=None)
    p.add_argument("--precisions", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--all-socs", action="store_true", help="SM8550, SM8650 and SM8750")
    p.add_argument("--parity", action="store_true", help="emulator call time + parity")
    p.add_argument("--parity-max-call-s", type=float, default=120.0)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--work", type=Path, default=ROOT / "artifacts" / "qnn")
    args = p.parse_args()
    rows = []
    for precision in args.precisions:
        for soc in (SOCS if args.all_socs else ("SM8650",)):
            out = args.work / f"{precision}-{soc.lower()}"
            full = args.latent_size is None and not args.spec.endswith("-tiny")
            row = summarize(precision, soc, timed_export(RECIPES[precision], soc, args.spec, out,
                                                         args.latent_size), full)
            row.update(date=datetime.now(timezone.utc).isoformat(timespec="seconds"))
            if args.parity:
                for name in COMPONENTS:
                    row[f"{name}_call_s"] = one_call_seconds(out, name)
                    if row[f"{name}_call_s"] <= args.parity_max_call_s:
                        row[f"{name}_psnr_db"] = parity_psnr(out, args.spec, name,
                                                             out.parent / f"{out.name}-parity-{name}")
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(rows, args, args.results)   # after each run: a later failure keeps the rows


if __name__ == "__main__":
    main()
