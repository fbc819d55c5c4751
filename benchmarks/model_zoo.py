"""Model zoo at full size: parameters, counted GMACs, eager fp32 CPU latency, peak RSS.

Usage: ``.venv/bin/python benchmarks/model_zoo.py [--specs sd15 snapfusion] [--iters 3]``
Writes ``benchmarks/results/model_zoo.{json,md}``. Each (spec, component) runs in its own
process so peak RSS is per component. Also checks, at full size, that the sd15 UNet equals
diffusers' SD-v1.5 UNet2DConditionModel (same weights -> max abs diff of the outputs).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import _common  # noqa: F401  (sets sys.path)
from _common import ROOT, write_results

COMPONENTS = ("text_encoder", "unet", "decoder")
PAPER = {("snapfusion", "unet"): "848M params, 230 ms/step iPhone 14 Pro",
         ("snapfusion", "text_encoder"): "123M, 4 ms", ("snapfusion", "decoder"): "13M, 116 ms",
         ("sd15", "unet"): "860M, ~1.7 s/step iPhone 14 Pro", ("sd15", "decoder"): "369 ms"}


def example_inputs(spec, component: str):
    import torch

    gen = torch.Generator().manual_seed(0)
    size = spec.unet.sample_size
    if component == "text_encoder":
        return (torch.randint(0, 49407, (1, spec.text_encoder.max_length), generator=gen),)
    if component == "unet":
        return (torch.randn(1, 4, size, size, generator=gen), torch.tensor([500.0]),
                torch.randn(1, spec.text_encoder.max_length, spec.unet.cross_attention_dim,
                            generator=gen))
    return (torch.randn(1, spec.decoder.latent_channels, size, size, generator=gen),)


def count_gmacs(module, inputs, component: str) -> float:
    """MACs counted by torch's FlopCounterMode (matmul/conv/attention FLOPs / 2).

    FlopCounterMode has no formula for the CPU flash-attention kernel that SDPA dispatches to,
    so attention is first rewritten to plain matmul-softmax (``attention_original``, which
    preserves numerics): otherwise the 64x64 attention maps would not be counted.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mobile_sd.surgery import apply_passes

    module = apply_passes(module, ["attention_original"], component)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops() / 2 / 1e9


def worker(spec_name: str, component: str, iters: int) -> dict:
    import torch

    from mobile_sd.models.text_encoder import TextEncoder
    from mobile_sd.models.zoo import build_component
    from mobile_sd.models.spec import load_spec
    from mobile_sd.utils.env import peak_rss_mb
    from _common import time_call

    spec = load_spec(spec_name)
    module = build_component(spec, component)
    if component == "text_encoder":
        module = TextEncoder(module)
    inputs = example_inputs(spec, component)
    params = sum(p.numel() for p in module.parameters())
    with torch.no_grad():
        timing = time_call(lambda: module(*inputs), warmup=1, iters=iters)
    gmacs = count_gmacs(module, inputs, component)  # after timing: it rewrites attention
    return {"spec": spec_name, "component": component, "params_m": params / 1e6,
            "gmacs": gmacs, "eager_fp32_ms": timing["median_s"] * 1e3,
            "eager_fp32_min_ms": timing["min_s"] * 1e3, "iters": iters,
            "eager_fp32_cpu_ms": timing["cpu_median_s"] * 1e3,
            "load_avg_1min": __import__("os").getloadavg()[0],
            "threads": torch.get_num_threads(), "peak_rss_mb": peak_rss_mb(),
            "paper": PAPER.get((spec_name, component), "")}


def sd15_equivalence_worker() -> dict:
    """Full-size: our sd15 UNet vs diffusers' UNet2DConditionModel with the same weights."""
    import torch
    from diffusers import UNet2DConditionModel

    from mobile_sd.models.diffusers_compat import diffusers_config_from_unet_spec
    from mobile_sd.models.spec import load_spec
    from mobile_sd.models.unet import EfficientUNet
    from mobile_sd.utils.env import peak_rss_mb

    spec = load_spec("sd15")
    config = {k: v for k, v in diffusers_config_from_unet_spec(spec.unet).items()
              if not k.startswith("_")}
    torch.manual_seed(0)
    theirs = UNet2DConditionModel(**config).eval()
    with torch.device("meta"):
        ours = EfficientUNet(spec.unet)
    ours.load_state_dict({k: v.clone() for k, v in theirs.state_dict().items()},
                         strict=True, assign=True)
    ours.eval()
    inputs = example_inputs(spec, "unet")
    with torch.no_grad():
        ref = theirs(*inputs).sample
        out = ours(*inputs)
    return {"max_abs_diff": float((ref - out).abs().max()), "ref_mean_abs": float(ref.abs().mean()),
            "keys_equal": {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
            == {k: tuple(v.shape) for k, v in ours.state_dict().items()},
            "peak_rss_mb": peak_rss_mb()}


def run_worker(args: list[str], iters: int) -> dict:
    cmd = [sys.executable, __file__, "--iters", str(iters), "--worker", *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--specs", nargs="+", default=["sd15", "snapfusion"])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--worker", nargs="*")
    args = parser.parse_args()
    if args.worker is not None:
        result = (sd15_equivalence_worker() if args.worker == ["equivalence"]
                  else worker(args.worker[0], args.worker[1], args.iters))
        print(json.dumps(result))
        return
    from tqdm import tqdm

    jobs = [(s, c) for s in args.specs for c in COMPONENTS]
    rows = [run_worker([s, c], args.iters) for s, c in tqdm(jobs, desc="model zoo")]
    equivalence = run_worker(["equivalence"], args.iters) if "sd15" in args.specs else None
    totals = {}
    for row in rows:
        totals.setdefault(row["spec"], 0.0)
        totals[row["spec"]] += row["params_m"]
    notes = ["Total params: " + ", ".join(f"{k} {v:,.1f}M" for k, v in totals.items()) + ".",
             "GMACs are counted by torch.utils.flop_counter (matmul, conv, attention) for one "
             "forward at batch 1 (UNet: 64x64 latent, 77 tokens; decoder: 64x64 -> 512x512).",
             "Latency: eager PyTorch fp32 on this CPU (2 threads), median wall time of the timed "
             "iterations after one warm-up, with the process CPU time per forward and the 1-min "
             "load average during the run (a load above 2 means other jobs shared the 2 cores "
             "and the wall time is inflated). The UNet runs twice per step with CFG.",
             "Random weights (no pretrained weights can be downloaded here); latency and "
             "MACs do not depend on weight values.",
             "SnapFusion paper: 848M UNet params; this reconstruction from the paper's per-stage "
             "counts has fewer (see the table): the paper does not publish Mid/Up-1 order, "
             "skip wiring or any widths that differ from SD-v1.5."]
    if equivalence:
        notes.append(f"Full-size sd15 UNet vs diffusers UNet2DConditionModel (same random "
                     f"weights): max abs output difference {equivalence['max_abs_diff']:.3g} "
                     f"(output mean |x| {equivalence['ref_mean_abs']:.3g}), state_dict keys "
                     f"and shapes equal: {equivalence['keys_equal']}.")
    write_results("model_zoo", rows, [
        ("spec", "spec"), ("component", "component"), ("params_m", "params (M)"),
        ("gmacs", "GMACs/forward"), ("eager_fp32_ms", "eager fp32 ms (median wall)"),
        ("eager_fp32_cpu_ms", "CPU ms/forward"), ("load_avg_1min", "load avg"),
        ("peak_rss_mb", "peak RSS MB"), ("paper", "paper (iPhone 14 Pro)")],
        "Model zoo: full-size components on this machine", notes,
        extra={"sd15_equivalence": equivalence})


if __name__ == "__main__":
    main()
