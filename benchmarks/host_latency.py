"""Host latency at full size, per component: eager fp32 vs ONNX Runtime vs .pte XNNPACK fp32 vs
.pte XNNPACK int8 — median/p90, load time, peak RSS, size, and the fraction of this CPU's
measured fp32 GEMM peak each one reaches.

Usage::

    .venv/bin/python benchmarks/host_latency.py [--spec snapfusion] [--iters 5]
        [--fp32 artifacts/android] [--int8 artifacts/android-int8] [--onnx artifacts/onnx]

The folders come from ``benchmarks/export_android.py`` (which also records the export times and
peak RSS, `make export-android` included); a missing one is an error naming that command. Every
runtime is measured in its own process (the runner protocol of `mobile_sd.bench.runner`;
eager through a small worker here), one at a time, with the same thread count.
Writes benchmarks/results/host_latency.{json,md}.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import _common  # noqa: F401
from _common import ROOT, write_results

RECIPES = {"fp32": "android-snapfusion-xnnpack-fp32", "int8": "android-snapfusion-xnnpack-int8",
           "onnx": "onnx-snapfusion"}
# First bars of the issue, on the UNet: speed-up of the .pte over eager fp32 PyTorch.
UNET_BARS = {"pte_fp32": 1.5, "pte_int8": 2.5}


def require_folder(kind: str, folder: Path) -> None:
    if not (folder / "manifest.json").is_file():
        raise SystemExit(f"{folder}: no {RECIPES[kind]} export; run "
                         f"`.venv/bin/python benchmarks/export_android.py --recipes {kind}` first")


def gemm_peak_gflops(threads: int) -> float:
    """Measured fp32 GEMM throughput of this CPU (torch matmul 2048^3, best of 5)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(5))
    return 2 * 2048**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_artifact(path: Path, inputs: list, iters: int, threads: int, data: Path | None) -> dict:
    cmd = [sys.executable, "-m", "mobile_sd.bench.runner", "--artifact", str(path), "--inputs",
           json.dumps(inputs), "--warmup", "1", "--iters", str(iters), "--threads", str(threads)]
    if data:
        cmd += ["--data-path", str(data)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    line = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "{}"
    result = json.loads(line)
    if result.get("status") != "ok":
        raise SystemExit(f"{path}: {result.get('reason') or proc.stderr[-2000:]}")
    return result


def eager_worker(spec: str, component: str, recipe: str, iters: int, threads: int) -> dict:
    """Eager fp32 PyTorch with the same I/O as the exported component (CFG folding included,
    no other surgery: this is the plain PyTorch path)."""
    import torch

    from mobile_sd.export.engine import build_component
    from mobile_sd.models.zoo import build_model
    from mobile_sd.recipes import load_recipe
    from mobile_sd.utils.env import peak_rss_mb

    torch.set_num_threads(threads)
    r = load_recipe(ROOT / "export_recipes" / f"{recipe}.yaml")
    start = time.perf_counter()
    model = build_model(spec, with_tokenizer=False)
    passes = ["cfg_fold"] if component == "unet" and r.cfg == "folded" else []
    comp = build_component(model, component, r, passes)
    load_ms = (time.perf_counter() - start) * 1e3
    inputs = comp.example_inputs()
    times = []
    with torch.no_grad():
        with macs_saved_by_upsample_fold(comp.module) as saved:   # the warm-up call
            comp.module(*inputs)
        for _ in range(iters):
            times.append(_timed(lambda: comp.module(*inputs)) * 1e3)
    return {"load_ms": load_ms, "iteration_ms": times, "peak_rss_mb": peak_rss_mb(),
            "fold_saved_gmacs": saved[0] / 1e9}


@contextlib.contextmanager
def macs_saved_by_upsample_fold(module):
    """MACs the XNNPACK exports do not run, counted over the calls inside the block: each 3x3
    conv that ``xnnpack_upsample`` folds becomes a 2x2 conv with 4x the output channels on the
    small input, over a grid one pixel larger (its padding) than the small input."""
    from mobile_sd.surgery.xnnpack_upsample import foldable_convs

    saved = [0]

    def count(conv, _inputs, output):
        n, out, height, width = output.shape        # the upsampled size
        phase_grid = (height // 2 + 1) * (width // 2 + 1)
        saved[0] += n * out * conv.in_channels * (9 * height * width - 4 * 4 * phase_grid)

    handles = [conv.register_forward_hook(count) for conv in foldable_convs(module)]
    try:
        yield saved
    finally:
        for handle in handles:
            handle.remove()


def _bar(component: str, runtime: str, speedup: float) -> str | None:
    need = UNET_BARS.get(runtime) if component == "unet" else None
    if need is None:
        return None
    return f">={need}x: {'met' if speedup >= need else 'NOT met'}"


def stats(times: list[float]) -> dict:
    """The median / p90 / min of the shared bench summary (``mobile_sd.bench.stats``)."""
    from mobile_sd.bench.stats import summarize

    summary = summarize(times)
    return {k: summary[k] for k in ("median_ms", "p90_ms", "min_ms")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--spec", default="snapfusion")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fp32", type=Path, default=ROOT / "artifacts" / "android")
    p.add_argument("--int8", type=Path, default=ROOT / "artifacts" / "android-int8")
    p.add_argument("--onnx", type=Path, default=ROOT / "artifacts" / "onnx")
    p.add_argument("--eager-worker", nargs=3)
    args = p.parse_args()
    if args.eager_worker:
        print(json.dumps(eager_worker(args.spec, *args.eager_worker[:2], int(args.eager_worker[2]),
                                      args.threads)))
        return
    from mobile_sd.manifest import load_manifest

    folders = {"pte_fp32": args.fp32, "pte_int8": args.int8, "onnx_fp32": args.onnx}
    for kind, folder in (("fp32", args.fp32), ("int8", args.int8), ("onnx", args.onnx)):
        require_folder(kind, folder)
    peak = gemm_peak_gflops(args.threads)
    manifests = {k: load_manifest(f) for k, f in folders.items()}
    zoo = json.loads((ROOT / "benchmarks/results/model_zoo.json").read_text())
    gmacs = {r["component"]: r["gmacs"] for r in zoo["rows"] if r["spec"] == args.spec}
    rows, folded_gmacs = [], {}
    for comp in ("text_encoder", "unet", "decoder"):
        ref = manifests["pte_fp32"]["components"][comp]
        # A folded UNet runs the UNet twice (batch 2) per call.
        macs = gmacs.get(comp, 0.0) * (2 if comp == "unet" else 1)   # 0: spec not in the zoo
        out = subprocess.run([sys.executable, __file__, "--spec", args.spec, "--threads",
                              str(args.threads), "--eager-worker", comp, RECIPES["fp32"],
                              str(args.iters)], capture_output=True, text=True, cwd=ROOT)
        eager = json.loads(out.stdout.strip().splitlines()[-1])
        measured = {"eager_fp32": (eager, None)}
        for kind, folder in folders.items():
            entry = manifests[kind]["components"][comp]
            model = next(f for f in entry["files"] if f["format"] in ("pte", "onnx"))
            data = next((folder / f["path"] for f in entry["files"] if f["format"] == "ptd"), None)
            size = sum(f["bytes"] for f in entry["files"] if f.get("role") in ("model", "weights"))
            measured[kind] = (run_artifact(folder / model["path"], entry["inputs"], args.iters,
                                           args.threads, data), size)
        base = stats(eager["iteration_ms"])["median_ms"]
        folded_gmacs[comp] = eager["fold_saved_gmacs"]
        for kind, (res, size) in measured.items():
            s = stats(res["iteration_ms"])
            rows.append({"component": comp, "runtime": kind, **{k: round(v, 1) for k, v in s.items()},
                         "load_ms": round(res["load_ms"], 0), "peak_rss_mb": round(res["peak_rss_mb"], 0),
                         "size_mb": round(size / 2**20, 1) if size else None,
                         "speedup_vs_eager": round(base / s["median_ms"], 2),
                         "gemm_peak_frac": round(2 * macs / (s["median_ms"] / 1e3) / peak, 3)
                         if macs else None,
                         "bar": _bar(comp, kind, base / s["median_ms"])})
    write_results("host_latency", rows, [
        ("component", "component"), ("runtime", "runtime"), ("median_ms", "median ms"),
        ("p90_ms", "p90 ms"), ("min_ms", "min ms"), ("load_ms", "load ms"),
        ("peak_rss_mb", "peak RSS MB"), ("size_mb", "size MB"),
        ("speedup_vs_eager", "x vs eager"), ("bar", "bar"),
        ("gemm_peak_frac", "of fp32 GEMM peak")],
        f"Host latency, {args.spec}, {args.threads} threads",
        [f"Measured fp32 GEMM peak of this CPU: {peak:.0f} GFLOP/s (torch 2048^3 matmul); the "
         "last column is counted GMACs x 2 / latency / that peak (int8 can exceed 1).",
         "The .pte rows run fewer MACs than counted: xnnpack_upsample folds each nearest-2x "
         "upsample into its 3x3 conv (4 taps per output instead of 9), "
         + ", ".join(f"{c} -{g:.1f} GMACs per call ({g / (gmacs[c] * (2 if c == 'unet' else 1)):.1%})"
                     for c, g in folded_gmacs.items() if g and gmacs.get(c))
         + "; their peak fraction still counts the original MACs.",
         "UNet calls are CFG-folded (batch 2 inside one call) in every runtime; ONNX uses batch 2.",
         "Random weights; latency does not depend on weight values.",
         "Size: what a device loads (program + weights: .pte + .ptd, .onnx + external data).",
         "Export folders (benchmarks/export_android.py): " + ", ".join(
             f"{k}: {manifests[k]['recipe']['name']} at git {str(manifests[k]['git_sha'])[:10]}"
             for k in folders)],
        extra={"gemm_peak_gflops": peak,
               "export_git_sha": {k: manifests[k]["git_sha"] for k in folders}})


if __name__ == "__main__":
    main()
