"""XNNPACK latency of exact rewrites of nearest 2x upsampling + 3x3 conv, per layer shape.

Usage: ``.venv/bin/python benchmarks/upsample_forms.py [--iters 7] [--threads 2]``
Writes ``benchmarks/results/upsample_forms.{json,md}``.

One diffusers ``Upsample2D`` (nearest 2x + 3x3 conv, seeded random weights) per row, exported
alone as an XNNPACK ``.pte`` in each form and precision (fp32; static int8 calibrated on 4
random batches), and timed in-process (median of ``--iters`` after one warm-up). Forms:
``phases``, what ``surgery.xnnpack_upsample`` ships (one 2x2 conv to 4x the channels, one
block per output phase, + depth-to-space); and the
two it was chosen over, defined here: ``transposed``, one 4x4 stride-2 transposed conv (its
previous form), and ``subpixel``, one 3x3 conv to 4x the channels + depth-to-space. The shapes
are the upsamplers of the full-size ``snapfusion`` UNet (CFG-folded: batch 2) and distilled
decoder (batch 1), plus SD-v1.5's decoder at 512 channels. Every export is checked against
eager (fp32: max abs in the notes).
"""
from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import _common  # noqa: F401  (sets sys.path)
from _common import time_call, write_results

# (channels, input size, batch, where the shape comes from)
SHAPES = ((1280, 8, 2, "snapfusion UNet up 0"), (1280, 16, 2, "snapfusion UNet up 1"),
          (640, 32, 2, "snapfusion UNet up 2"), (512, 64, 1, "SD-v1.5 decoder up 0"),
          (256, 64, 1, "snapfusion decoder up 0"), (256, 128, 1, "snapfusion decoder up 1"),
          (128, 256, 1, "snapfusion decoder up 2"))
FORMS = ("phases", "transposed", "subpixel")


def upsampler(channels: int, seed: int):
    from diffusers.models.upsampling import Upsample2D

    torch.manual_seed(seed)
    return Upsample2D(channels, use_conv=True).eval()


class _Transposed(torch.nn.Module):
    """One 4x4 stride-2 transposed conv: 4 kernel taps per output pixel, Subconv2D in XNNPACK."""

    def __init__(self, conv):
        super().__init__()
        # (4 transposed-conv taps) x (3 conv taps) per axis, as the phase taps interleaved.
        fold = torch.tensor(((0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 0)), dtype=torch.float64)
        kernel = torch.einsum("ak,bl,oikl->ioab", fold, fold, conv.weight.detach().double())
        self.register_buffer("kernel", kernel.float().contiguous())
        self.register_buffer("bias", conv.bias.detach().clone())

    def forward(self, x):
        return F.conv_transpose2d(x, self.kernel, self.bias, stride=2, padding=1)


class _Subpixel(torch.nn.Module):
    """One 3x3 conv with 4x the output channels (phase kernels zero-padded to 3x3)."""

    def __init__(self, conv):
        from mobile_sd.surgery.xnnpack_upsample import PHASES, phase_kernel

        super().__init__()
        blocks = phase_kernel(conv.weight).chunk(4)
        kernels = [F.pad(k, (b, 1 - b, a, 1 - a))      # 2x2 window (a, b) inside the 3x3
                   for (a, b), k in zip(PHASES, blocks)]
        self.register_buffer("kernel", torch.cat(kernels).detach())
        self.register_buffer("bias", conv.bias.detach().repeat(4))

    def forward(self, x):
        from mobile_sd.surgery.xnnpack_upsample import depth_to_space

        return depth_to_space(F.conv2d(x, self.kernel, self.bias, padding=1))


def rewritten(eager, form: str):
    from mobile_sd.surgery import xnnpack_upsample

    if form == "transposed":
        return _Transposed(eager.conv).eval()
    if form == "subpixel":
        return _Subpixel(eager.conv).eval()
    module = copy.deepcopy(eager)
    xnnpack_upsample.apply(module)
    return module


def time_pte(path: Path, inputs: tuple, iters: int) -> float:
    """Median wall ms of ``forward`` on an already loaded program."""
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(path).load_method("forward")
    return time_call(lambda: method.execute(list(inputs)), iters=iters)["median_s"] * 1e3


def measure(channels: int, size: int, batch: int, iters: int, folder: Path) -> dict:
    from mobile_sd.export.executorch.lower import export_pte
    from mobile_sd.runtimes.pte import run_pte

    eager = upsampler(channels, seed=channels + size)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=gen)
    calibration = [(torch.randn(x.shape, generator=gen),) for _ in range(4)]
    with torch.no_grad():
        want = eager(x)
    row = {}
    for form in FORMS:
        module = rewritten(eager, form)
        for precision in ("fp32", "int8"):
            path = folder / f"{form}_{precision}.pte"
            result = export_pte(module, (x,), path, precision=precision, overwrite=True,
                                calibration=calibration if precision == "int8" else None)
            if result.delegation["num_partitions"] != 1 or result.delegation["portable_ops"]:
                raise SystemExit(f"{form} {precision} at {channels}@{size}: not one XNNPACK "
                                 f"partition: {result.delegation}")
            row[f"{form}_{precision}_ms"] = time_pte(path, (x,), iters)
            err = (run_pte(path, (x,))[0] - want).abs().max().item()
            row[f"{form}_{precision}_max_abs"] = err
            if precision == "fp32" and err > 1e-4 * max(1.0, want.abs().max().item()):
                raise SystemExit(f"{form} fp32 at {channels}@{size}: max abs {err:.2e} vs eager")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from tqdm.auto import tqdm

    from mobile_sd.runtimes.pte import set_threads

    set_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for channels, size, batch, where in tqdm(SHAPES, desc="upsample forms"):
            rows.append({"shape": f"{channels}@{size}x{size}, batch {batch}", "where": where,
                         **measure(channels, size, batch, args.iters, Path(tmp))})
    columns = [("shape", "channels@input, batch"), ("where", "layer")] + [
        (f"{form}_{precision}_ms", f"{form} {precision} ms")
        for precision in ("fp32", "int8") for form in FORMS]
    notes = [f"executorch XNNPACK, {args.threads} threads, median of {args.iters} runs after a "
             "warm-up; one upsampler exported alone (fp32 I/O, so int8 rows include the "
             "quantize/dequantize at its edges).",
             "fp32 exports vs eager, max abs: " + ", ".join(
                 f"{form} <= {max(r[f'{form}_fp32_max_abs'] for r in rows):.1e}"
                 for form in FORMS) + " (int8 in the JSON).",
             "x86 host only: phones' (ARM) XNNPACK kernels were not measured."]
    print(write_results("upsample_forms", rows, columns,
                        "Nearest 2x upsample + 3x3 conv: exact rewrites on XNNPACK",
                        notes, {"threads": args.threads, "iters": args.iters}))


if __name__ == "__main__":
    main()
