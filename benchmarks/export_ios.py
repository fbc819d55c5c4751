"""Full-size Core ML export (`make export-ios`) for snapfusion and sd15, fp16 and 6-bit, and our
palettizer vs coremltools' k-means, in one run.

Usage: ``.venv/bin/python benchmarks/export_ios.py [--specs snapfusion sd15]
[--variants 6bit fp16] [--subset 5] [--keep]``. Writes ``benchmarks/results/export_ios.{json,md}``.

* Each export is ``mobile-sd export`` in its own process under ``/usr/bin/time -v`` (Debian's
  ``time`` package): wall time and peak RSS of exactly what a user runs. The 6-bit snapfusion
  run is `make export-ios`'s command (``ios-snapfusion-fast.yaml``); sd15 uses
  ``ios-sd15-swift.yaml``; the fp16 variants are those recipes with every compression section
  removed (written to a temp file), so the UNet is chunked for the 1 GB limit.
* Palettizer: ``benchmarks/palettize_speed.py``'s measurement run in the same job: ours on
  every SD-v1.5 UNet-shaped weight, coremltools' k-means on ``--subset`` of them (its
  whole-UNet time extrapolated by value count: the full run takes ~8 min and 9 GB), weight SNR
  of both against the same weights.

The machine is shared: the load average before/after each run is recorded next to its times.
Run it alone (~1 h): one full-size job at a time.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import _common  # noqa: F401  (sets sys.path)
from _common import ROOT, timed_export, write_results

RECIPES = {"snapfusion": "ios-snapfusion-fast.yaml", "sd15": "ios-sd15-swift.yaml"}
TIME = "/usr/bin/time"
BAR_SECONDS, BAR_RSS_GB = 600, 12.0


def recipe_file(spec: str, variant: str, folder: Path) -> Path:
    """The shipped recipe (6bit) or a copy with every compression section removed (fp16)."""
    import yaml

    shipped = ROOT / "export_recipes" / RECIPES[spec]
    if variant == "6bit":
        return shipped
    data = yaml.safe_load(shipped.read_text())
    data["name"] += "-fp16"
    data.pop("compression", None)
    for comp in data.get("components", {}).values():
        comp.pop("compression", None)
    path = folder / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def export_run(spec: str, variant: str, out: Path, recipes: Path) -> dict:
    recipe = recipe_file(spec, variant, recipes)
    run = timed_export(recipe, spec, out)
    comps = run.pop("manifest")["components"]
    size = lambda c: sum(f["bytes"] for f in comps[c]["files"]) / 2**20  # noqa: E731
    return {"spec": spec, "variant": variant, "recipe": recipe.name, **run,
            "text_encoder_mb": round(size("text_encoder"), 1), "unet_mb": round(size("unet"), 1),
            "decoder_mb": round(size("decoder"), 1),
            "unet_files": ", ".join(f["path"] for f in comps["unet"]["files"]),
            "unet_s": comps["unet"]["export_seconds"]}


# --- palettizer comparison (benchmarks/palettize_speed.py's functions, in a subprocess) ------

def palettizer_worker(nbits: int, subset: int) -> dict:
    """Ours on every SD-v1.5 UNet-shaped weight, coremltools' k-means on ``subset`` of them."""
    import palettize_speed as ps

    shapes = ps.unet_weight_shapes()
    ours = ps.run_ours(shapes, nbits)
    rows = ps.run_subset(shapes, nbits, subset)
    sub_params = sum(r["params_m"] for r in rows)
    return {"nbits": nbits, "ours": ours, "subset": rows,
            "coremltools_full_s_extrapolated": sum(r["coremltools_s"] for r in rows)
            * ours["params_m"] / sub_params}


def run_palettizer(nbits: int, subset: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(nbits), str(subset)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT / "benchmarks")
    return json.loads(out.stdout.strip().splitlines()[-1])


def palettizer_rows(p: dict) -> list[dict]:
    """Whole-UNet rows (ours measured, coremltools extrapolated) and the like-for-like subset."""
    ours, rows, bits = p["ours"], p["subset"], p["nbits"]
    base = {"spec": "sd15 UNet shapes", "variant": f"palettizer {bits}-bit per tensor"}
    sub_m = sum(r["params_m"] for r in rows)
    pooled = lambda key: _pooled_snr(rows, key)  # noqa: E731
    return [
        {**base, "recipe": f"ours, all {ours['tensors']} weights ({ours['params_m']:.0f}M)",
         "wall_s": round(ours["seconds"], 1), "cpu_s": round(ours["cpu_seconds"], 1),
         "weight_snr_db": round(ours["total_snr_db"], 2),
         "peak_rss_gb": round(ours["peak_rss_mb"] / 1024, 2)},
        {**base, "recipe": "coremltools k-means, all weights (extrapolated from the subset)",
         "wall_s": round(p["coremltools_full_s_extrapolated"])},
        {**base, "recipe": f"ours, subset of {len(rows)} weights ({sub_m:.0f}M)",
         "wall_s": round(sum(r["ours_fp16_s"] for r in rows), 1),
         "weight_snr_db": pooled("ours_fp16_snr_db")},
        {**base, "recipe": f"coremltools k-means, same subset ({sub_m:.0f}M)",
         "wall_s": round(sum(r["coremltools_s"] for r in rows), 1),
         "weight_snr_db": pooled("coremltools_snr_db")},
    ]


def _pooled_snr(rows: list[dict], key: str) -> float:
    """Energy-weighted SNR of the subset (each weight's energy ~ its size: randn/sqrt(fan_in))."""
    import math

    err = sum(r["params_m"] * 10 ** (-r[key] / 10) for r in rows)
    return round(10 * math.log10(sum(r["params_m"] for r in rows) / err), 2)


COLUMNS = [("spec", "spec"), ("variant", "variant"), ("recipe", "recipe / method"),
           ("wall_s", "wall s"), ("cpu_s", "cpu s"), ("peak_rss_gb", "peak RSS GB"),
           ("unet_mb", "UNet MB"), ("text_encoder_mb", "text enc MB"),
           ("decoder_mb", "decoder MB"), ("unet_files", "UNet files"),
           ("weight_snr_db", "weight SNR dB"), ("load_before", "load before"),
           ("load_after", "load after")]
TITLE = "Core ML export (iOS): full size, this machine"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--specs", nargs="+", default=["snapfusion", "sd15"])
    parser.add_argument("--variants", nargs="+", default=["6bit", "fp16"])
    parser.add_argument("--subset", type=int, default=5, help="tensors for coremltools' k-means")
    parser.add_argument("--keep", action="store_true", help="keep the exported bundles")
    parser.add_argument("--render", action="store_true",
                        help="only re-render results/export_ios.md from the saved JSON")
    parser.add_argument("--worker", nargs=2)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(palettizer_worker(int(args.worker[0]), int(args.worker[1]))))
        return
    if args.render:
        return render_saved()
    if not Path(TIME).exists():
        sys.exit(f"{TIME} is missing: apt-get install time")
    work = Path(tempfile.mkdtemp(prefix="export-ios-bench-", dir=ROOT / "artifacts"
                                 if (ROOT / "artifacts").is_dir() else None))
    rows = []
    try:
        for spec in args.specs:
            for variant in args.variants:
                print(f"export {spec} {variant} ...", flush=True)
                rows.append(export_run(spec, variant, work / f"{spec}-{variant}", work))
                print(json.dumps(rows[-1]), flush=True)
                if not args.keep:
                    shutil.rmtree(work / f"{spec}-{variant}", ignore_errors=True)
        print("palettizer comparison ...", flush=True)
        pal = run_palettizer(6, args.subset)
        rows += palettizer_rows(pal)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    write_results("export_ios", rows, COLUMNS, TITLE, notes(rows, pal),
                  extra={"palettizer": pal})


def render_saved() -> None:
    """The Markdown from the saved JSON (its own date, sha and versions), e.g. after a note
    changed: the figures are never retyped."""
    from _common import RESULTS, render_markdown

    data = json.loads((RESULTS / "export_ios.json").read_text())
    md = render_markdown(data, COLUMNS, TITLE, notes(data["rows"], data["palettizer"]))
    (RESULTS / "export_ios.md").write_text(md)


def notes(rows: list[dict], pal: dict) -> list[str]:
    bar = next((r for r in rows if r["spec"] == "snapfusion" and r["variant"] == "6bit"), None)
    subset = pal["subset"]
    gap = max(abs(r["ours_fp16_snr_db"] - r["coremltools_snr_db"]) for r in subset)
    found = [
        "Exports: `mobile-sd export ... --force` in a subprocess under /usr/bin/time -v; wall "
        "time and peak RSS of the whole process (model build, reference pipeline run, "
        "surgery, torch.export, ct.convert, palettization, chunking, structure checks, ANE "
        "lint). cpu_s = user + system seconds; the machine is shared (load = 1-min load average "
        "before/after), so wall time above cpu_s/2 is time spent waiting for the 2 cores.",
        "6bit: snapfusion = `make export-ios` (ios-snapfusion-fast.yaml, iOS18: UNet one 6-bit "
        "LUT per 32 output channels, text encoder one per tensor, decoder fp16); sd15 = "
        "ios-sd15-swift.yaml (iOS17, one 6-bit LUT per tensor, all three). fp16: the same "
        "recipe without compression (the UNet exceeds 1 GB and is chunked in two).",
        "Palettizer rows (benchmarks/palettize_speed.py's functions, run here in one "
        "process): every conv/linear weight shape of the SD-v1.5 UNet with > 2048 values "
        f"({pal['ours']['tensors']} weights, {pal['ours']['params_m']:.0f}M values), seeded "
        "randn/sqrt(fan_in), 6 bits per tensor. coremltools' k-means (scikit-learn, what "
        "palettize_weights(mode='kmeans') runs per weight; the optional kmeans1d package is not "
        f"installed) ran on {len(subset)} of them (the 2 largest, the quartile, the "
        "median and the smallest weight); its whole-UNet time is extrapolated linearly by "
        "value count. stack.md's measured anchor for palettize_weights on the whole SD-v1.5 "
        "UNet on this machine: 472 s, 9.2 GB peak. SNR = 10 log10(sum w^2 / sum (w - w')^2) "
        "vs the fp32 weights, pooled over weights.",
        f"Weight SNR per subset weight, ours vs coremltools: "
        + ", ".join(f"{r['ours_fp16_snr_db']:.3f} vs {r['coremltools_snr_db']:.3f}"
                    for r in subset)
        + f" dB (largest gap {gap:.3f} dB): both reach the 1-D k-means optimum on these "
        "Gaussian weights; the difference is time.",
        "Random weights: real trained weights have other distributions; SNRs compare the two "
        "algorithms on identical tensors, not the quality of a trained model.",
    ]
    if bar:
        met = bar["wall_s"] <= BAR_SECONDS and bar["peak_rss_gb"] <= BAR_RSS_GB
        found.insert(0, f"Bar (issue 3): the whole snapfusion pipeline, fp16 + 6-bit, in <= "
                        f"{BAR_SECONDS // 60} min and <= {BAR_RSS_GB:.0f} GB peak RSS: "
                        f"{bar['wall_s'] / 60:.1f} min, {bar['peak_rss_gb']:.1f} GB "
                        f"({'met' if met else 'NOT met'}).")
    return found


if __name__ == "__main__":
    main()
