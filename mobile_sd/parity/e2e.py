"""End to end: the whole pipeline with the artifact's components, against the fp32 reference.

The same :func:`~mobile_sd.pipeline.reference.run_pipeline` drives both: the reference with
the eager fp32 modules, the export with :class:`Runners` adapters around the component runners
(the adapters translate the pipeline's calls to the artifact's I/O contract: Swift layouts,
folded CFG). A component the recipe did not export runs eagerly and is named in the report.
Images are compared with PSNR (data range 255) and SSIM; the gate is the recipe's
``e2e_min_psnr_db`` (default 30 dB).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mobile_sd.metrics import image_stats

AMPLIFY = 8  # the difference image is |ref - test| * AMPLIFY, so 1/8 of full scale is white


def _text_adapter(runner, interface: str):
    dtype = torch.float32 if interface == "swift" else torch.int64
    return lambda ids: runner(ids.to(dtype))[0]


def _unet_adapter(runner, interface: str, cfg: str, guidance: float):
    if cfg == "folded":
        scale = torch.tensor([float(guidance)])

        def folded(sample, timestep, context):
            # The pipeline sends [uncond, cond] and applies guidance to a batch-2 prediction;
            # the folded UNet already returns the guided one: duplicate it so that
            # uncond + g * (cond - uncond) leaves it unchanged.
            guided = runner(sample[:1], timestep[:1], context[1:], context[:1], scale)[0]
            return torch.cat([guided, guided])
        return folded
    if interface == "swift":
        return lambda s, t, ctx: runner(s, t, ctx.transpose(1, 2).unsqueeze(2))[0]
    return lambda s, t, ctx: runner(s, t, ctx)[0]


def backend_runners(runners: dict, model, manifest):
    """:class:`Runners` calling the artifact's components; components the recipe did not
    export run eagerly. Returns ``(Runners, names of eager components)``."""
    from mobile_sd.names import COMPONENT_NAMES
    from mobile_sd.pipeline.reference import Runners, eager_runners

    pipe = manifest.pipeline
    interface = manifest.recipe.get("interface", "native")
    eager = eager_runners(model)
    made = {"text_encoder": lambda r: _text_adapter(r, interface),
            "unet": lambda r: _unet_adapter(r, interface, pipe.get("cfg", "batch2"),
                                            pipe.get("guidance", 4.5)),
            "decoder": lambda r: (lambda z: r(z)[0])}
    calls = {name: made[name](runners[name]) if name in runners else getattr(eager, name)
             for name in COMPONENT_NAMES}
    return Runners(**calls), [n for n in calls if n not in runners]


def generate_with(runners, model, manifest, prompt: str, seed: int,
                  unet_outputs_epsilon: bool = False) -> np.ndarray:
    """One image through ``runners`` with the export's pipeline settings (steps, guidance).
    ``unet_outputs_epsilon``: the UNet runner is an export wrapped by ``v_to_epsilon``."""
    from mobile_sd.pipeline.reference import run_pipeline

    import dataclasses

    pipe, spec = manifest.pipeline, model.spec
    latent = pipe.get("latent_size", spec.unet.sample_size)
    scheduler = spec.scheduler
    if unet_outputs_epsilon:
        # The exported UNet outputs epsilon: the same DDIM, told so (exactly the v trajectory).
        scheduler = dataclasses.replace(scheduler, prediction_type="epsilon")
    result = run_pipeline(runners, model.tokenizer, scheduler, latent, prompt, "", pipe.get("steps", spec.scheduler.default_steps),
                          pipe.get("guidance", spec.scheduler.default_guidance), seed,
                          pipe.get("scaling_factor", spec.decoder.scaling_factor),
                          spec.decoder.latent_channels, progress=False)
    return result.image


def run_e2e(runners: dict, model, manifest: dict, prompts: Sequence[str],
            reference_images: Sequence[np.ndarray], gate_db: float, seed: int = 0) -> dict:
    """Generate every prompt with the artifact, compare with the reference images.

    Returns the report entry, with the generated images under ``"_images"`` (not serialized).
    """
    pipeline, eager_names = backend_runners(runners, model, manifest)
    unet = manifest.components.get("unet")
    epsilon = "unet" in runners and unet is not None and "v_to_epsilon" in unet.surgery
    rows, images = [], []
    for i, (prompt, ref) in enumerate(zip(prompts, reference_images)):
        image = generate_with(pipeline, model, manifest, prompt, seed + i, epsilon)
        images.append(image)
        rows.append({"prompt": prompt, "seed": seed + i, **image_stats(ref, image)})
    worst_psnr = min(r["psnr_db"] for r in rows)
    return {"status": "pass" if worst_psnr >= gate_db else "fail", "gate_min_psnr_db": gate_db,
            "min_psnr_db": worst_psnr, "min_ssim": min(r["ssim"] for r in rows),
            "eager_components": eager_names, "prompts": rows, "_images": images}


def image_grid(reference: Sequence[np.ndarray], columns: dict[str, Sequence[np.ndarray]],
               path: str | Path, min_size: int = 256) -> Path:
    """A PNG with one row per prompt: reference, each backend, and each backend's amplified
    difference (``|ref - test| * AMPLIFY``). Tiny test images are upscaled (nearest) to
    ``min_size`` so the grid stays readable."""
    from PIL import Image, ImageDraw

    cells = [("reference", list(reference))]
    for name, images in columns.items():
        cells.append((name, list(images)))
    for name, images in columns.items():
        diffs = [np.clip(np.abs(r.astype(np.int16) - t.astype(np.int16)) * AMPLIFY, 0, 255)
                 .astype(np.uint8) for r, t in zip(reference, images)]
        cells.append((f"|diff| x{AMPLIFY} {name}", diffs))
    h, w = reference[0].shape[:2]
    scale = max(1, -(-min_size // max(h, w)))
    cw, ch, label_h = w * scale, h * scale, 16
    grid = Image.new("RGB", (cw * len(cells), label_h + ch * len(reference)), "white")
    draw = ImageDraw.Draw(grid)
    for col, (name, images) in enumerate(cells):
        draw.text((col * cw + 3, 2), name[: cw // 6], fill="black")
        for row, img in enumerate(images):
            tile = Image.fromarray(img).resize((cw, ch), Image.NEAREST)
            grid.paste(tile, (col * cw, label_h + row * ch))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
