"""Core ML bundles checked on Linux: the MIL runtime through ``mobile-sd parity``.

Usage (full size: one job at a time on the shared machine, never beside another export)::

    .venv/bin/python benchmarks/coreml_parity.py                 # artifacts/ios (+ fp16 variant)
    .venv/bin/python benchmarks/coreml_parity.py --spec snapfusion-tiny --latent-size 8 \\
        --work /tmp/coreml-parity --results /tmp/coreml-parity/results     # proves it works

Bundles: the ``make export-ios`` bundle (ios-snapfusion-fast: 6-bit UNet and text encoder,
fp16 decoder) and its fp16 variant (same recipe, no palettes), exported into ``--work`` when
missing (``rm -r artifacts/ios`` to re-export it, as ``make export-ios`` does). For each:
``mobile-sd parity`` exactly as ``make parity`` runs it (components, end to end, the Swift app
emulated on the bundle; default prompts) in its own process under ``/usr/bin/time -v`` (wall
time, peak RSS), the components again fp32-widened (``--coreml-mode fp32``), and one UNet call
on the MIL runtime vs the eager fp32 UNet. Bars: whole check of the 6-bit bundle <= 15 min and
<= 12 GB; MIL UNet call <= 3x eager fp32. Writes ``<results>/coreml_parity.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _common
from _common import ROOT, time_report, write_results

RECIPE = ROOT / "export_recipes" / "ios-snapfusion-fast.yaml"
BARS = {"check_minutes": 15.0, "peak_rss_gb": 12.0, "unet_vs_eager": 3.0}
COLUMNS = [("bundle", "bundle"), ("component", "component"), ("status", "status"),
           ("typed_psnr_db", "PSNR as typed (dB)"), ("widened_psnr_db", "PSNR fp32-widened (dB)"),
           ("gate_db", "gate (dB)"), ("ssim", "SSIM"), ("mil_s", "MIL s/call"),
           ("eager_s", "eager fp32 s/call"), ("ratio", "MIL / eager"), ("seconds", "check s"),
           ("peak_rss_gb", "peak RSS GB"), ("note", "note")]


def fp16_recipe(work: Path) -> Path:
    """ios-snapfusion-fast without palettes: the fp16 variant of the same bundle."""
    import yaml

    data = yaml.safe_load(RECIPE.read_text())
    data.pop("compression", None)
    data.pop("components", None)
    data["name"] = "ios-snapfusion-fast-fp16"
    data["description"] = "ios-snapfusion-fast without palettes (fp16 weights)"
    path = work / "ios-snapfusion-fast-fp16.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _python(*args: str) -> list[str]:
    return ["/usr/bin/time", "-v", sys.executable, *args]


def _run_timed(cmd: list[str]) -> tuple[str, float, float]:
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 1):       # 1: a gate failed, still a result
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout, wall, time_report(proc.stderr)["peak_rss_gb"]


def ensure_bundle(folder: Path, recipe: Path, args) -> None:
    if (folder / "manifest.json").is_file():
        return
    cmd = [sys.executable, "-m", "mobile_sd", "export", "--recipe", str(recipe), "--spec",
           args.spec, "--out", str(folder), "--force"]
    if args.latent_size:
        cmd += ["--latent-size", str(args.latent_size)]
    print("exporting", folder, flush=True)
    _run_timed(["/usr/bin/time", "-v", *cmd])


def child(args) -> None:
    """The UNet timing in its own process (its peak RSS is not the check's)."""
    import torch

    from mobile_sd.models.zoo import build_model

    torch.set_num_threads(args.threads)
    print(json.dumps(unet_timing(Path(args.child_folder), build_model(args.spec))))


def unet_timing(folder: Path, model) -> dict:
    """Seconds per UNet call: MIL runtime (as typed) vs the eager fp32 UNet, same inputs."""
    import torch

    from mobile_sd.manifest import load_manifest
    from mobile_sd.parity import eager
    from mobile_sd.runtimes.component import open_component
    from _common import time_call

    manifest = load_manifest(folder)
    model = eager.at_latent_size(model, int(manifest.pipeline["latent_size"]))
    runner = open_component(folder, manifest, "unet")
    original = eager.original_component(model, manifest, "unet")
    inputs = original.example_inputs(0)
    with torch.no_grad():
        mil = time_call(lambda: runner(*inputs), warmup=1, iters=2)
        ref = time_call(lambda: original.module(*inputs), warmup=1, iters=2)
    return {"mil_s": mil["median_s"], "eager_s": ref["median_s"]}


def parity_cmd(folder: Path, out: Path, spec: str, *extra: str) -> list[str]:
    """``mobile-sd parity`` as ``make parity`` runs it on the iOS bundle (default prompts,
    threads, gates), its report written to ``out``."""
    return ["/usr/bin/time", "-v", sys.executable, "-m", "mobile_sd", "parity", str(folder),
            "--spec", spec, "--fail-on-skip", "--quiet", "--out", str(out), *extra]


def check_bundle(name: str, folder: Path, args) -> tuple[list[dict], dict]:
    out = Path(args.work) / "reports" / name
    # The whole check, exactly as `make parity` runs it: components, end to end, Swift app.
    _, wall, rss = _run_timed(parity_cmd(folder, out / "typed", args.spec))
    # The same components fp32-widened: what fp16 storage costs (no e2e, no locator).
    _run_timed(parity_cmd(folder, out / "widened", args.spec, "--coreml-mode", "fp32",
                          "--no-e2e", "--no-locate"))
    timing_out, _, _ = _run_timed(_python(__file__, "--spec", args.spec, "--threads",
                                          str(args.threads), "--child", "timing",
                                          "--child-folder", str(folder)))
    timing = json.loads(timing_out.strip().splitlines()[-1])
    typed = json.loads((out / "typed" / "parity.json").read_text())
    wide = json.loads((out / "widened" / "parity.json").read_text())
    rows = []
    for comp, entry in typed["components"].items():
        fp32 = entry.get("tiers", {}).get("fp32", {})
        wfp32 = wide["components"][comp].get("tiers", {}).get("fp32", {})
        loc = (entry.get("locator") or {}).get("module")
        row = {"bundle": name, "component": comp, "status": entry["status"],
               "typed_psnr_db": (fp32.get("worst") or {}).get("psnr_db"),
               "widened_psnr_db": (wfp32.get("worst") or {}).get("psnr_db"),
               "gate_db": fp32.get("gate_min_psnr_db"), "seconds": entry.get("seconds"),
               "note": f"first divergence: {loc}" if loc else entry.get("reason")}
        if comp == "unet":
            row.update(mil_s=timing["mil_s"], eager_s=timing["eager_s"],
                       ratio=timing["mil_s"] / timing["eager_s"])
        rows.append(row)
    for key, label in (("e2e", "end to end (DDIM)"), ("swift_app", "Swift app (DPM-Solver++)")):
        part = typed.get(key) or {}
        rows.append({"bundle": name, "component": label, "status": part.get("status"),
                     "typed_psnr_db": part.get("min_psnr_db"), "ssim": part.get("min_ssim"),
                     "gate_db": part.get("gate_min_psnr_db"), "note": part.get("reason")})
    total = {"bundle": name, "component": "whole check (make parity)",
             "status": typed["summary"]["status"], "seconds": round(wall, 1),
             "peak_rss_gb": round(rss, 2), "note": f"{len(typed['settings']['prompts'])} "
             f"prompts x {typed['settings']['steps']} steps"}
    return rows + [total], {"check_s": wall, "peak_rss_gb": rss,
                            "unet_ratio": timing["mil_s"] / timing["eager_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default="snapfusion")
    p.add_argument("--latent-size", type=int, default=None)
    p.add_argument("--ios", type=Path, default=ROOT / "artifacts" / "ios",
                   help="the 6-bit bundle (make export-ios); exported into --work if missing")
    p.add_argument("--fp16", type=Path, default=None, help="its fp16 variant (default: --work)")
    p.add_argument("--work", type=Path, default=ROOT / "artifacts" / "coreml-parity")
    p.add_argument("--results", type=Path, default=None, help="default: benchmarks/results")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", choices=["timing"], help=argparse.SUPPRESS)
    p.add_argument("--child-folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    args.work.mkdir(parents=True, exist_ok=True)
    six_bit = args.ios if args.latent_size is None else args.work / "ios"
    fp16 = args.fp16 or args.work / "ios-fp16"
    ensure_bundle(six_bit, RECIPE, args)
    ensure_bundle(fp16, fp16_recipe(args.work), args)
    rows, bars = [], {}
    for name, folder in (("6-bit", six_bit), ("fp16", fp16)):
        got, bars[name] = check_bundle(name, folder, args)
        rows += got
        print(json.dumps(got[-1]), flush=True)
    six = bars["6-bit"]
    verdict = {"check_minutes": six["check_s"] / 60, "peak_rss_gb": six["peak_rss_gb"],
               "unet_vs_eager": six["unet_ratio"]}
    met = {k: verdict[k] <= BARS[k] for k in BARS}
    if args.results is not None:
        _common.RESULTS = args.results
    notes = [f"spec {args.spec}" + (f", latent {args.latent_size}" if args.latent_size else ""),
             "bars (6-bit bundle): " + ", ".join(
                 f"{k} {verdict[k]:.2f} <= {BARS[k]:g}: {'met' if met[k] else 'NOT met'}"
                 for k in BARS),
             "PSNR vs the fp32 original (worst sample); as typed = fp16 vars rounded to fp16, "
             "widened = same program in fp32 (difference: fp16 loss).",
             "The MIL runtime is a reference for the program's numerics, not the Neural "
             "Engine's arithmetic (docs/coreml.md, 'Checked on Linux')."]
    path = write_results("coreml_parity", rows, COLUMNS, "Core ML bundles checked on Linux "
                         "(MIL runtime)", notes, extra={"bars": BARS, "measured": verdict,
                                                        "met": met})
    print(path)


if __name__ == "__main__":
    main()
