"""XNNPACK latency of the two forms ``surgery.xnnpack_upsample`` picks between, per layer shape.

Usage: ``.venv/bin/python benchmarks/upsample_forms.py [--iters 7] [--threads 2]``
Writes ``benchmarks/results/upsample_forms.{json,md}``.

One diffusers ``Upsample2D`` (nearest 2x + 3x3 conv, seeded random weights) per row, exported
alone as an XNNPACK ``.pte`` in each form (4x4 stride-2 transposed conv "fold", or 3x3 conv to
4x channels + depth-to-space "sub-pixel") and precision (fp32; static int8 calibrated on 4
random batches), and timed in-process (median of ``--iters`` after one warm-up). The shapes
are the upsamplers of the full-size ``snapfusion`` UNet (CFG-folded: batch 2) and distilled
decoder (batch 1), plus SD-v1.5's decoder at 512 channels. ``SUBPIXEL_MIN_CHANNELS`` in the
pass is chosen from this table. The fp32 rows also check each export against eager (max abs).
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (sets sys.path)
from _common import write_results

# (channels, input size, batch, where the shape comes from)
SHAPES = ((1280, 8, 2, "snapfusion UNet up 0"), (1280, 16, 2, "snapfusion UNet up 1"),
          (640, 32, 2, "snapfusion UNet up 2"), (512, 64, 1, "SD-v1.5 decoder up 0"),
          (256, 64, 1, "snapfusion decoder up 0"), (256, 128, 1, "snapfusion decoder up 1"),
          (128, 256, 1, "snapfusion decoder up 2"))
FORMS = {"fold": 10**9, "subpixel": 1}  # form -> subpixel_min_channels that selects it


def upsampler(channels: int, seed: int):
    import torch
    from diffusers.models.upsampling import Upsample2D

    torch.manual_seed(seed)
    return Upsample2D(channels, use_conv=True).eval()


def time_pte(path: Path, inputs: tuple, iters: int) -> float:
    """Median wall ms of ``forward`` on an already loaded program."""
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(path).load_method("forward")
    method.execute(list(inputs))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        method.execute(list(inputs))
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def measure(channels: int, size: int, batch: int, iters: int, folder: Path) -> dict:
    import torch

    from mobile_sd.exporters.executorch import export_pte
    from mobile_sd.exporters.et_runtime import run_pte
    from mobile_sd.surgery import xnnpack_upsample

    eager = upsampler(channels, seed=channels + size)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=gen)
    calibration = [(torch.randn(x.shape, generator=gen),) for _ in range(4)]
    with torch.no_grad():
        want = eager(x)
    row = {}
    for form, min_channels in FORMS.items():
        module = copy.deepcopy(eager)
        xnnpack_upsample.apply(module, subpixel_min_channels=min_channels)
        for precision in ("fp32", "int8"):
            path = folder / f"{form}_{precision}.pte"
            result = export_pte(module, (x,), path, precision=precision, overwrite=True,
                                calibration=calibration if precision == "int8" else None)
            if result.delegation["num_partitions"] != 1 or result.delegation["portable_ops"]:
                raise SystemExit(f"{form} {precision} at {channels}@{size}: not one XNNPACK "
                                 f"partition: {result.delegation}")
            row[f"{form}_{precision}_ms"] = time_pte(path, (x,), iters)
            if precision == "fp32":
                got = run_pte(path, (x,))[0]
                row[f"{form}_fp32_max_abs"] = (got - want).abs().max().item()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from tqdm.auto import tqdm

    from mobile_sd.exporters.et_runtime import set_threads
    from mobile_sd.surgery.xnnpack_upsample import SUBPIXEL_MIN_CHANNELS

    set_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for channels, size, batch, where in tqdm(SHAPES, desc="upsample forms"):
            row = {"shape": f"{channels}@{size}x{size}, batch {batch}", "where": where,
                   **measure(channels, size, batch, args.iters, Path(tmp))}
            row["picked"] = "subpixel" if channels >= SUBPIXEL_MIN_CHANNELS else "fold"
            rows.append(row)
    columns = [("shape", "channels@input, batch"), ("where", "layer"),
               ("fold_fp32_ms", "fold fp32 ms"), ("subpixel_fp32_ms", "sub-pixel fp32 ms"),
               ("fold_int8_ms", "fold int8 ms"), ("subpixel_int8_ms", "sub-pixel int8 ms"),
               ("picked", f"pass picks (threshold {SUBPIXEL_MIN_CHANNELS})")]
    notes = [f"executorch XNNPACK, {args.threads} threads, median of {args.iters} runs after a "
             "warm-up; one upsampler exported alone (fp32 I/O, so int8 rows include the "
             "quantize/dequantize at its edges).",
             "fp32 exports vs eager, max abs: fold <= %.1e, sub-pixel <= %.1e." % (
                 max(r["fold_fp32_max_abs"] for r in rows),
                 max(r["subpixel_fp32_max_abs"] for r in rows)),
             "x86 host only: phones' (ARM) XNNPACK kernels were not measured."]
    print(write_results("upsample_forms", rows, columns,
                        "Upsample forms: transposed-conv fold vs sub-pixel conv (XNNPACK)",
                        notes, {"threads": args.threads, "iters": args.iters}))


if __name__ == "__main__":
    main()
