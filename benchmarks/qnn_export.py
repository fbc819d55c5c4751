"""QNN HTP context-binary exports (``format: qnn``): time, peak RSS, sizes; emulator parity.

Usage: ``python benchmarks/qnn_export.py [--spec snapfusion] [--latent-size N] [--all-socs]
[--precisions fp16 w8a16] [--parity] [--results DIR]``. Writes ``DIR/qnn_export.{json,md}``
(default ``benchmarks/results``).

Each export is ``mobile-sd export`` in its own process under ``/usr/bin/time -v`` (Debian's
``time``), one at a time: wall time and peak RSS of what a user runs. Default SoC SM8650;
``--all-socs`` adds SM8550 and SM8750. Bar: the full-size w8a16 export of all three components
<= 20 min and <= 12 GB. ``--parity``: one timed call per component of ``--emulate`` in the HTP
emulator and its PSNR vs the fp32 original on the same inputs (about a second per GMAC: ~10 min
for a full-size w8a16 UNet call), then ``mobile-sd parity`` per component (no end-to-end run)
when that call took <= ``--parity-max-call-s``. ``--reuse`` reads an export's figures from its
complete log instead of exporting again; rows merge into the results file by precision + SoC.
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
PROMPT = "a photo of a cat"   # parity's recorded pipeline inputs: one prompt


def _mobile_sd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mobile_sd", *args]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}


def timed_export(recipe: str, soc: str, spec: str, out: Path, latent: int | None,
                 reuse: bool = False) -> dict:
    """``mobile-sd export --soc`` under ``/usr/bin/time -v`` (``_common.timed_export``)."""
    extra = ["--soc", soc] + (["--latent-size", str(latent)] if latent else [])
    return _common.timed_export(ROOT / "export_recipes" / f"{recipe}.yaml", spec, out, extra,
                                reuse=reuse)


def one_call(folder: Path, name: str, spec: str) -> dict:
    """One emulator call of ``name`` (timed after its session is open, one thread) and its
    output's PSNR vs the fp32 original on the same inputs (the component's seeded example
    inputs; for a UNet the CFG batch): the full-size figure when parity's 8 steps do not fit."""
    import torch

    from mobile_sd.manifest import load_manifest
    from mobile_sd.metrics import psnr_db
    from mobile_sd.models.zoo import build_model
    from mobile_sd.parity import eager
    from mobile_sd.runtimes.component import open_component

    torch.set_num_threads(1)
    manifest = load_manifest(folder)
    model = eager.at_latent_size(build_model(spec), int(manifest.pipeline["latent_size"]))
    original = eager.original_component(model, manifest, name)
    inputs = original.example_inputs(0)
    with torch.no_grad():
        expected = original.module(*inputs)
    expected = expected[0] if isinstance(expected, (tuple, list)) else expected
    del model, original
    runner = open_component(folder, manifest, name, num_threads=1)
    start = time.perf_counter()
    got = runner(*inputs)[0]
    seconds = round(time.perf_counter() - start, 2)
    return {f"{name}_call_s": seconds, f"{name}_call_psnr_db": round(psnr_db(expected, got), 1)}


def parity_psnr(folder: Path, spec: str, name: str, out: Path) -> float | None:
    """fp32-tier worst PSNR of one component from ``mobile-sd parity`` on the real pipeline
    inputs of one prompt (its every recorded call of the component, no random inputs)."""
    subprocess.run(_mobile_sd("parity", str(folder), "--spec", spec, "--quiet", "--no-e2e",
                              "--no-locate", "--random-inputs", "0", "--prompts", PROMPT,
                              "--threads", "1", "--components", name, "--out", str(out)),
                   capture_output=True, text=True, cwd=ROOT, env=_env())
    report = out / "parity.json"
    if not report.is_file():
        return None
    comp = json.loads(report.read_text())["components"].get(name, {})
    worst = comp.get("tiers", {}).get("fp32", {}).get("worst") or {}
    return round(worst["psnr_db"], 1) if "psnr_db" in worst else None


def batch1_gmacs(spec: str) -> dict[str, float] | None:
    """Counted GMACs per batch-1 call (benchmarks/results/model_zoo.json), if measured."""
    path = RESULTS / "model_zoo.json"
    if not path.is_file():
        return None
    rows = json.loads(path.read_text())["rows"]
    found = {r["component"]: r["gmacs"] for r in rows if r["spec"] == spec}
    return found if set(found) >= set(COMPONENTS) else None


def emulate(row: dict, folder: Path, args) -> None:
    """One timed emulator call per component, then its parity, smallest component first.

    At full size a UNet or decoder call is hundreds of GMACs: from the seconds per GMAC of the
    last component measured, a call predicted over ``--max-call-s`` is not run and its
    prediction is written down instead (``*_call_note``), never reported as a measurement;
    ``mobile-sd parity`` (every recorded call of one prompt: 8 UNet calls) runs only after a
    call of at most ``--parity-max-call-s``."""
    gmacs = batch1_gmacs(args.spec)
    manifest = json.loads((folder / "manifest.json").read_text())
    rate = None
    for name in args.emulate:
        batch = manifest["components"][name]["inputs"][0]["shape"][0]
        work = gmacs[name] * batch if gmacs else None
        if rate is not None and work is not None and rate * work > args.max_call_s:
            row[f"{name}_call_note"] = (f"not run: {work:.0f} GMAC per call, ~{rate * work / 60:.0f}"
                                        f" min predicted at the measured {rate:.2f} s/GMAC")
            continue
        row.update(one_call(folder, name, args.spec))
        if work:
            rate = row[f"{name}_call_s"] / work
            row[f"{name}_s_per_gmac"] = round(rate, 2)
        print(json.dumps({k: row[k] for k in row if k.startswith(name)}), flush=True)
        if row[f"{name}_call_s"] <= args.parity_max_call_s:
            row[f"{name}_psnr_db"] = parity_psnr(folder, args.spec, name,
                                                 folder.parent / f"{folder.name}-parity-{name}")


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
           *((f"{n}_call_psnr_db", f"{n} PSNR dB (that call)") for n in COMPONENTS),
           *((f"{n}_psnr_db", f"{n} PSNR dB (parity)") for n in COMPONENTS),
           *((f"{n}_s_per_gmac", f"{n} emulator s/GMAC") for n in COMPONENTS),
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
         "not a device latency; PSNR (that call): its output vs the fp32 original on the same "
         "seeded example inputs; PSNR (parity): `mobile-sd parity` fp32 tier (worst call) on the "
         f"recorded pipeline inputs of one prompt ({PROMPT!r}), no e2e, run when one call "
         "took <= --parity-max-call-s.",
         *(f"{r['precision']} {r['soc']} {n}: {r[f'{n}_call_note']}" for r in rows
           for n in COMPONENTS if r.get(f"{n}_call_note")),
         "Bar applies to the full-size w8a16 export of all three components.",
         *(f"{r['precision']} {r['soc']}: export figures read from its own `/usr/bin/time -v` "
           "log (`--reuse`; load average not logged)" for r in rows if r.get("reused_log")),
         "Commands: " + "; ".join(f"`{r['command']}`" for r in rows)]))
    return path


def _merged(rows: list[dict], results: Path) -> list[dict]:
    """Earlier rows of the same results file, with this run's rows (same precision + SoC):
    merged into the earlier row when this run reused that export (emulator calls measured in a
    later run than the export), replacing it when this run exported again."""
    path = results / "qnn_export.json"
    old = json.loads(path.read_text())["rows"] if path.is_file() else []
    merged = {(r["precision"], r["soc"]): r for r in old}
    for r in rows:
        key = (r["precision"], r["soc"])
        merged[key] = {**merged.get(key, {}), **r} if r.get("reused_log") else r
    return list(merged.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--spec", default="snapfusion")
    p.add_argument("--latent-size", type=int, default=None)
    p.add_argument("--precisions", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--all-socs", action="store_true", help="SM8550, SM8650 and SM8750")
    p.add_argument("--parity", action="store_true", help="emulator call time + parity")
    p.add_argument("--parity-max-call-s", type=float, default=120.0,
                   help="run mobile-sd parity on a component whose one call took at most this")
    p.add_argument("--max-call-s", type=float, default=1800.0,
                   help="skip a call predicted to take longer (the prediction is written down)")
    p.add_argument("--emulate", nargs="+", default=["text_encoder"], choices=COMPONENTS,
                   help="components timed (and checked) in the emulator with --parity")
    p.add_argument("--reuse", action="store_true", help="an export whose log is complete is "
                   "read from that log instead of exported again")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--work", type=Path, default=ROOT / "artifacts" / "qnn")
    args = p.parse_args()
    rows = []
    for precision in args.precisions:
        for soc in (SOCS if args.all_socs else ("SM8650",)):
            out = args.work / f"{precision}-{soc.lower()}"
            full = args.latent_size is None and not args.spec.endswith("-tiny")
            row = summarize(precision, soc, timed_export(RECIPES[precision], soc, args.spec, out,
                                                         args.latent_size, args.reuse), full)
            row.update(date=datetime.now(timezone.utc).isoformat(timespec="seconds"))
            if args.parity:
                emulate(row, out, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(_merged(rows, args.results), args, args.results)   # a later failure keeps them


if __name__ == "__main__":
    main()
