"""Palettization speed and quality on SD-v1.5-UNet-shaped weights: ours vs coremltools.

Usage: ``.venv/bin/python benchmarks/palettize_speed.py [--nbits 6] [--subset 5] [--limit N]``
Writes ``benchmarks/results/palettize_speed.{json,md}``.

The weight shapes are every conv / linear weight of diffusers' ``UNet2DConditionModel`` with
the SD-v1.5 config (built on the ``meta`` device: no memory), keeping those above
coremltools' ``weight_threshold`` (2048 elements). Each weight is generated (seeded
``randn / sqrt(fan_in)``, fp32), palettized, and dropped, so at most one weight (~59 MB) is
alive: the timing covers palettization only, and peak RSS is the palettizer's. The issue's
anchor is ``coremltools.optimize.coreml.palettize_weights(mode="kmeans")`` on the full UNet:
472 s and 9.2 GB at 6 bits. On a subset (the largest and a few other weights) coremltools'
k-means runs on the same weights, cast to fp16 as in a converted model, through the function
its ``palettize_weights`` pass calls per weight; ours runs on the same fp16 values too.
"""
from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np

import _common  # noqa: F401  (sets sys.path)
from _common import write_results


def unet_weight_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of SD-v1.5 UNet conv/linear weights with > 2048 elements."""
    import torch
    from diffusers import UNet2DConditionModel

    from mobile_sd.models.diffusers_compat import diffusers_config_from_unet_spec
    from mobile_sd.models.spec import load_spec

    config = {k: v for k, v in diffusers_config_from_unet_spec(load_spec("sd15").unet).items()
              if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    return [(f"{name}.weight", tuple(mod.weight.shape)) for name, mod in unet.named_modules()
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)) and mod.weight.numel() > 2048]


def random_weight(index: int, shape: tuple[int, ...]) -> np.ndarray:
    import torch

    gen = torch.Generator().manual_seed(index)
    fan_in = int(np.prod(shape[1:]))
    return (torch.randn(shape, generator=gen) / fan_in ** 0.5).numpy()


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(shapes, nbits: int) -> dict:
    from mobile_sd.compress import palettize_tensor

    wall = cpu = 0.0
    energy = err = 0.0
    snrs, params = [], 0
    for i, (_, shape) in enumerate(shapes):
        w = random_weight(i, shape)
        t0, c0 = time.perf_counter(), time.process_time()
        pal = palettize_tensor(w, nbits)
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        snrs.append(pal.snr_db)
        e = float(np.einsum("i,i->", w.ravel().astype(np.float64), w.ravel().astype(np.float64)))
        energy, err = energy + e, err + e / 10 ** (pal.snr_db / 10)
        params += w.size
        del w, pal
    return {"tensors": len(shapes), "params_m": params / 1e6, "seconds": wall,
            "cpu_seconds": cpu, "ns_per_weight": wall / params * 1e9,
            "mean_snr_db": float(np.mean(snrs)), "total_snr_db": 10 * np.log10(energy / err),
            "peak_rss_mb": rss_mb()}


def coremltools_kmeans(w16: np.ndarray, nbits: int):
    """What ``palettize_weights(mode="kmeans")`` computes for one per-tensor weight."""
    from coremltools.optimize.coreml._quantization_passes import palettize_weights

    params = palettize_weights.blockwise_compress(w16, "KMEANS", nbits, [0] * w16.ndim)
    return palettize_weights.decompress(params)


def run_subset(shapes, nbits: int, count: int) -> list[dict]:
    from mobile_sd.compress import palettize_tensor, weight_snr_db

    order = sorted(range(len(shapes)), key=lambda i: -np.prod(shapes[i][1]))
    picks = order[:2] + order[len(order) // 4: len(order) // 4 + 1] + \
        order[len(order) // 2: len(order) // 2 + 1] + order[-1:]
    rows = []
    for i in picks[:count]:
        name, shape = shapes[i]
        w = random_weight(i, shape)
        w16 = w.astype(np.float16)
        t0 = time.perf_counter()
        theirs = coremltools_kmeans(w16, nbits)
        t_theirs = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours16 = palettize_tensor(w16, nbits)
        t_ours16 = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours32 = palettize_tensor(w, nbits)
        t_ours32 = time.perf_counter() - t0
        t0 = time.perf_counter()
        grouped = (palettize_tensor(w, 4, "per_grouped_channel", 16) if shape[0] % 16 == 0
                   else None)  # coremltools skips such weights too
        t_grouped = time.perf_counter() - t0
        rows.append({
            "tensor": name, "shape": list(shape), "params_m": w.size / 1e6,
            "coremltools_s": t_theirs, "coremltools_snr_db": weight_snr_db(w, theirs),
            "ours_fp16_s": t_ours16, "ours_fp16_snr_db": weight_snr_db(w, ours16.dequantized()),
            "ours_fp32_s": t_ours32, "ours_fp32_snr_db": ours32.snr_db,
            "ours_4bit_grouped16_s": t_grouped if grouped else None,
            "ours_4bit_grouped16_snr_db": grouped.snr_db if grouped else None,
            "ours_4bit_per_tensor_snr_db": palettize_tensor(w, 4).snr_db})
        print(rows[-1], flush=True)
    return rows


def _fmt_list(values) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nbits", type=int, default=6)
    parser.add_argument("--subset", type=int, default=5, help="tensors compared to coremltools")
    parser.add_argument("--limit", type=int, default=None, help="only the first N weights")
    parser.add_argument("--repeat", type=int, default=2,
                        help="full runs of ours (the machine is shared: keep the fastest)")
    args = parser.parse_args(argv)

    shapes = unet_weight_shapes()[:args.limit]
    load_before = os.getloadavg()[0]
    rss_before = rss_mb()
    runs = []
    for _ in range(args.repeat):
        runs.append(run_ours(shapes, args.nbits))
        print({"ours": runs[-1]}, flush=True)
    ours = min(runs, key=lambda r: r["seconds"])
    subset = run_subset(shapes, args.nbits, args.subset)
    speedup = [r["coremltools_s"] / r["ours_fp16_s"] for r in subset] or [float("nan")]
    rows = [{"method": f"ours {args.nbits}-bit per_tensor k-means", "scope": "all UNet weights",
             **ours},
            {"method": f"coremltools {args.nbits}-bit kmeans (issue anchor)",
             "scope": "all UNet weights", "seconds": 472.0, "peak_rss_mb": 9.2 * 1024,
             "tensors": len(shapes), "params_m": ours["params_m"]}]
    for r in subset:
        rows.append({"method": f"coremltools {args.nbits}-bit kmeans", "scope": r["tensor"],
                     "params_m": r["params_m"], "seconds": r["coremltools_s"],
                     "mean_snr_db": r["coremltools_snr_db"]})
        rows.append({"method": f"ours {args.nbits}-bit (same fp16 values)", "scope": r["tensor"],
                     "params_m": r["params_m"], "seconds": r["ours_fp16_s"],
                     "mean_snr_db": r["ours_fp16_snr_db"]})
    notes = [
        f"{ours['tensors']} weights, {ours['params_m']:.1f}M parameters (conv/linear weights "
        "> 2048 elements); random fp32 weights randn/sqrt(fan_in), generated outside the timing.",
        f"ours: {ours['seconds']:.1f} s wall ({ours['cpu_seconds']:.1f} s CPU), "
        f"{ours['ns_per_weight']:.1f} ns/weight, peak RSS {ours['peak_rss_mb']:.0f} MB "
        f"(process, {rss_before:.0f} MB after imports). Fastest of {len(runs)} runs "
        f"(wall s: {_fmt_list(r['seconds'] for r in runs)}; CPU s: "
        f"{_fmt_list(r['cpu_seconds'] for r in runs)}). Load average "
        f"{load_before:.1f} before the run on this shared 2-core machine: wall times include "
        "other users' load; ours is single-threaded, so CPU s is its cost on an idle core.",
        f"subset speedup over coremltools' per-weight k-means: "
        f"{min(speedup):.0f}x to {max(speedup):.0f}x.",
        "SNR = 10*log10(sum w^2 / sum (w - w')^2) against the fp32 weights; total_snr_db pools "
        "all weights, mean_snr_db averages per-weight SNRs. coremltools runs an exact O(kn) "
        "1-D DP (its vendored kmeans1d) on fp16 weights with >= 10,000 elements, so its SNR "
        "is the optimum for those fp16 values; extra.subset has 4 decimals and ours on fp32.",
        "extra.subset also times ours at 4 bits per_grouped_channel (group_size 16)."]
    path = write_results(
        "palettize_speed", rows,
        [("method", "method"), ("scope", "scope"), ("params_m", "params (M)"),
         ("seconds", "seconds"), ("cpu_seconds", "CPU s"), ("mean_snr_db", "mean SNR dB"),
         ("total_snr_db", "pooled SNR dB"), ("peak_rss_mb", "peak RSS MB")],
        "Palettization speed: SD-v1.5 UNet-shaped weights", notes,
        extra={"nbits": args.nbits, "subset": subset, "runs": runs,
               "load_avg_before": load_before,
               "load_avg_after": os.getloadavg()[0], "rss_after_imports_mb": rss_before})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
