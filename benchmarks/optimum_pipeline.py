"""Our ONNX export (``interface: optimum``) run by Hugging Face optimum's pipeline, vs our reference.

Usage: ``.venv/bin/python benchmarks/optimum_pipeline.py [--spec snapfusion-tiny]
[--latent-size 16] [--model DIR] [--export DIR] [--out DIR] [--venv DIR]``.

optimum-onnx 0.1.0 needs transformers<4.58 and mobile-sd pins 5.25, so optimum runs in a venv
of its own, built here on first use (``--venv``, default ``~/.cache/mobile-sd/venv-optimum``):
``torch==2.13.0`` first (the CPU build of our main venv), then
``benchmarks/requirements-optimum.txt``. Steps:

1. export the model with ``export_recipes/onnx-snapfusion.yaml`` (``interface: optimum``), unless
   ``--export`` names a finished export;
2. our reference pipeline (eager fp32, DDIM v-prediction trailing, the export's steps and
   guidance) for the prompt and seed;
3. in the optimum venv: ``ORTStableDiffusionPipeline.from_pretrained(export)`` with the same
   prompt, steps, guidance and the same initial latents (``torch.randn`` of the seed, which is
   what our pipeline draws), ``output_type="np"``;
4. PSNR of the two images (float [0, 1] and uint8), into ``<out>/optimum_pipeline.json``.

Full size: ``--spec snapfusion`` (one full-size job at a time on a shared machine).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import _common  # noqa: F401  (sets sys.path)
from _common import ROOT, provenance

REQUIREMENTS = ROOT / "benchmarks" / "requirements-optimum.txt"
DEFAULT_VENV = Path.home() / ".cache" / "mobile-sd" / "venv-optimum"
RECIPE = ROOT / "export_recipes" / "onnx-snapfusion.yaml"

# Runs inside the optimum venv: argv = export dir, latents .npy, prompt, steps, guidance, out .npy
OPTIMUM_RUN = """
import sys, numpy as np, torch
from optimum.onnxruntime import ORTStableDiffusionPipeline
folder, latents, prompt, steps, guidance, out = sys.argv[1:7]
pipe = ORTStableDiffusionPipeline.from_pretrained(folder)
latents = torch.from_numpy(np.load(latents))
size = latents.shape[-1] * pipe.vae_scale_factor
image = pipe(prompt, latents=latents, num_inference_steps=int(steps),
             guidance_scale=float(guidance), height=size, width=size, output_type="np").images[0]
np.save(out, image.astype(np.float32))
print(type(pipe).__name__, type(pipe.scheduler).__name__, dict(pipe.scheduler.config)["prediction_type"])
"""


def ensure_venv(venv: Path) -> Path:
    """The optimum venv's python, creating the venv first if needed."""
    python = venv / "bin" / "python"
    if python.is_file():
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)   # before optimum pulls another torch
    subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True)
    return python


def load_model(args):
    from mobile_sd.models.folder import load_model_folder
    from mobile_sd.models.zoo import build_model

    return load_model_folder(args.model) if args.model else build_model(args.spec)


def export(args, folder: Path):
    from mobile_sd.export.engine import run_export
    from mobile_sd.recipes import load_recipe

    recipe = load_recipe(RECIPE)
    if recipe.interface != "optimum":
        raise SystemExit(f"{RECIPE.name} must have interface: optimum")
    if args.latent_size:
        recipe = dataclasses.replace(recipe, latent_size=args.latent_size)
    run_export(recipe, load_model(args), folder, overwrite=True)


def reference(args, manifest, out: Path):
    """Our pipeline's image (float HxWx3 in [0, 1]); saves the initial latents it drew."""
    import numpy as np
    import torch

    from mobile_sd.parity.eager import at_latent_size
    from mobile_sd.pipeline.reference import eager_runners, run_pipeline

    pipe = manifest.pipeline
    latent = int(pipe["latent_size"])
    model = at_latent_size(load_model(args), latent)
    channels = model.spec.decoder.latent_channels
    torch.manual_seed(args.seed)
    initial = torch.randn((1, channels, latent, latent),
                          generator=torch.Generator().manual_seed(args.seed))
    np.save(out / "latents.npy", initial.numpy())   # what run_pipeline draws for this seed
    runners = eager_runners(model)
    with torch.no_grad():
        result = run_pipeline(runners, model.tokenizer, model.spec.scheduler, latent,
                              args.prompt, "", pipe["steps"], pipe["guidance"], args.seed,
                              pipe["scaling_factor"], channels, progress=False)
        image = runners.decoder(result.latents / pipe["scaling_factor"])
    return (image[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy(), pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", default="snapfusion-tiny")
    parser.add_argument("--model", help="a model folder instead of --spec")
    parser.add_argument("--latent-size", type=int, default=16,
                        help="latent size of the export (0: the recipe's)")
    parser.add_argument("--export", type=Path, help="use this finished export")
    parser.add_argument("--out", type=Path, default=Path("/tmp/mobile-sd-optimum"))
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--prompt", default="a photo of an astronaut riding a horse on mars")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import numpy as np
    import torch

    from mobile_sd.manifest import load_manifest
    from mobile_sd.metrics import psnr_db

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    python = ensure_venv(args.venv)
    folder = args.export or args.out / "export"
    if not args.export:
        export(args, folder)
    ours, pipe = reference(args, load_manifest(folder), args.out)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([str(python), "-c", OPTIMUM_RUN, str(folder), str(args.out / "latents.npy"),
                          args.prompt, str(pipe["steps"]), str(pipe["guidance"]),
                          str(args.out / "optimum.npy")], env=env, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"optimum run failed:\n{run.stderr[-3000:]}")
    theirs = np.load(args.out / "optimum.npy")
    to_u8 = lambda x: (x * 255).round().astype(np.uint8)  # noqa: E731
    result = {"benchmark": "optimum_pipeline", **provenance(), "export": str(folder),
              "model": args.model or args.spec, "prompt": args.prompt, "seed": args.seed,
              "steps": pipe["steps"], "guidance": pipe["guidance"],
              "image_shape": list(theirs.shape), "optimum": run.stdout.strip().splitlines()[-1],
              "psnr_db": psnr_db(ours, theirs, data_range=1.0),
              "psnr_uint8_db": psnr_db(to_u8(ours), to_u8(theirs), data_range=255.0),
              "max_abs_diff": float(np.abs(ours - theirs).max())}
    (args.out / "optimum_pipeline.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("image_shape", "optimum", "psnr_db",
                                             "psnr_uint8_db", "max_abs_diff")}))


if __name__ == "__main__":
    main()
