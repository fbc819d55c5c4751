"""fp32 PyTorch reference pipeline: DDIM, v-prediction or epsilon, classifier-free guidance.

The loop talks to three callables (:class:`Runners`) so the same code drives eager PyTorch and,
in parity runs, exported components on their runtimes.

Example (not run by the tests: it needs real artifacts)::

    from mobile_sd.models.zoo import build_model
    result = generate(build_model("snapfusion-tiny"), "a cat")
    result.image.shape
    # -> (128, 128, 3)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from mobile_sd.errors import InvalidArgumentError
from mobile_sd.models.spec import SchedulerSpec
from mobile_sd.pipeline.recorder import Recorder

Tensor = torch.Tensor


@dataclass
class Runners:
    """``text_encoder(ids[B,77]) -> [B,77,D]``, ``unet(sample, t[B], ctx) -> pred``,
    ``decoder(z) -> image[-1,1]``."""
    text_encoder: Callable[[Tensor], Tensor]
    unet: Callable[[Tensor, Tensor, Tensor], Tensor]
    decoder: Callable[[Tensor], Tensor]


@dataclass
class GenerationResult:
    image: np.ndarray          # uint8 HxWx3
    latents: Tensor            # final latents before decoding (scaled)
    timesteps: list[int]


def eager_runners(model) -> Runners:
    """Runners calling the fp32 PyTorch modules of a :class:`~mobile_sd.models.zoo.Model`."""
    from mobile_sd.models.text_encoder import TextEncoder

    text = TextEncoder(model.text_encoder)
    return Runners(text_encoder=text, unet=model.unet, decoder=model.decoder)


def make_scheduler(spec: SchedulerSpec):
    """diffusers ``DDIMScheduler`` configured from the spec (the reference sampler)."""
    from diffusers import DDIMScheduler

    from mobile_sd.models.folder import scheduler_config

    config = {k: v for k, v in scheduler_config(spec).items() if not k.startswith("_")}
    return DDIMScheduler(**config)


#: Classifier-free guidance beyond this only saturates the image (useful values are ~1..15);
#: 1e308 overflows the latents to inf and decodes to an all-black PNG.
MAX_GUIDANCE = 100.0
#: Latent side bound: 256 latent = 2048 px with the usual VAE factor 8, 4x what SD-1.x /
#: SnapFusion are trained for (64 = 512 px). Larger needs tens of GB (the UNet's attention is
#: quadratic in the latent area) and would be killed by the OOM killer instead of refused.
MAX_LATENT_SIZE = 256
SEED_LIMIT = 2**64   # torch.Generator seeds are 64-bit


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_generation_args(steps: int, guidance: float, spec: SchedulerSpec) -> None:
    """Reject invalid values with a message saying what is allowed."""
    if not _is_int(steps) or not 1 <= steps <= spec.num_train_timesteps:
        raise InvalidArgumentError(f"--steps must be an integer in 1..{spec.num_train_timesteps}, "
                                   f"got {steps!r}")
    if (not isinstance(guidance, (int, float)) or not math.isfinite(guidance)
            or not 0 <= guidance <= MAX_GUIDANCE):
        raise InvalidArgumentError(f"--guidance must be a finite number >= 0 and <= {MAX_GUIDANCE:g} "
                                   f"(1 disables classifier-free guidance; useful values are "
                                   f"~1..15), got {guidance!r}")


def validate_seed(seed: int) -> None:
    if not _is_int(seed) or not 0 <= seed < SEED_LIMIT:
        raise InvalidArgumentError(f"--seed must be an integer in 0..2**64-1 (a 64-bit "
                                   f"generator seed), got {seed!r:.40}")


def validate_latent_size(size: int, multiple: int = 1) -> None:
    """``size`` in ``multiple..MAX_LATENT_SIZE`` and divisible by ``multiple`` (the UNet's
    downsampling; the export recipe checks its own multiple of 8)."""
    if not _is_int(size) or size % multiple or not multiple <= size <= MAX_LATENT_SIZE:
        step = "" if multiple == 1 else f"a multiple of {multiple} "
        raise InvalidArgumentError(
            f"--latent-size must be {step}in {multiple}..{MAX_LATENT_SIZE} (256 latent = 2048 "
            f"px; larger would need tens of GB), got {size!r:.40}")


def _encode(runners: Runners, tokenizer, prompt: str, recorder: Recorder | None, branch: str):
    from mobile_sd.models.tokenizer import tokenize

    ids = tokenize(tokenizer, [prompt])
    hidden = runners.text_encoder(ids)
    if recorder is not None:
        recorder.record("text_encoder", {"input_ids": ids}, {"last_hidden_state": hidden},
                        branch=branch)
    return hidden


@torch.no_grad()
def run_pipeline(runners: Runners, tokenizer, scheduler_spec: SchedulerSpec, latent_size: int,
                 prompt: str, negative_prompt: str = "", steps: int = 8, guidance: float = 4.5,
                 seed: int = 0, scaling_factor: float = 0.18215, latent_channels: int = 4,
                 recorder: Recorder | None = None, progress: bool = True) -> GenerationResult:
    """Generate one image. With guidance > 1 the UNet runs once per step on batch 2
    ``[uncond, cond]`` and returns ``uncond + guidance * (cond - uncond)``."""
    from tqdm.auto import tqdm

    validate_generation_args(steps, guidance, scheduler_spec)
    validate_seed(seed)
    validate_latent_size(latent_size)
    use_cfg = guidance > 1
    cond = _encode(runners, tokenizer, prompt, recorder, "cond")
    context = cond
    if use_cfg:
        uncond = _encode(runners, tokenizer, negative_prompt, recorder, "uncond")
        context = torch.cat([uncond, cond])
    scheduler = make_scheduler(scheduler_spec)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((1, latent_channels, latent_size, latent_size), generator=generator)
    latents = latents * scheduler.init_noise_sigma
    for i, t in enumerate(tqdm(scheduler.timesteps, desc="denoising", disable=not progress)):
        batch = torch.cat([latents] * 2) if use_cfg else latents
        timestep = torch.full((batch.shape[0],), float(t))
        pred = runners.unet(batch, timestep, context)
        if recorder is not None:
            recorder.record("unet", {"sample": batch, "timestep": timestep,
                                     "encoder_hidden_states": context}, {"noise_pred": pred},
                            step=i, timestep=int(t))
        if use_cfg:
            pred_uncond, pred_cond = pred.chunk(2)
            pred = pred_uncond + guidance * (pred_cond - pred_uncond)
        latents = scheduler.step(pred, t, latents).prev_sample
    z = latents / scaling_factor
    image = runners.decoder(z)
    if recorder is not None:
        recorder.record("decoder", {"z": z}, {"image": image})
    return GenerationResult(image=to_uint8(image), latents=latents,
                            timesteps=[int(t) for t in scheduler.timesteps])


def to_uint8(image: Tensor) -> np.ndarray:
    """[-1, 1] NCHW float -> HxWx3 uint8 (first batch item)."""
    image = (image[0].float() / 2 + 0.5).clamp(0, 1)
    return (image.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def generate(model, prompt: str, negative_prompt: str = "", steps: int | None = None,
             guidance: float | None = None, seed: int = 0, recorder: Recorder | None = None,
             progress: bool = True) -> GenerationResult:
    """Run the fp32 eager reference pipeline of ``model`` (a :class:`Model`)."""
    sched = model.spec.scheduler
    return run_pipeline(
        eager_runners(model), model.tokenizer, sched, model.spec.unet.sample_size, prompt,
        negative_prompt, sched.default_steps if steps is None else steps,
        sched.default_guidance if guidance is None else guidance, seed,
        model.spec.decoder.scaling_factor, model.spec.decoder.latent_channels, recorder, progress)


def save_png(image: np.ndarray, path) -> None:
    """Write an HxWx3 uint8 image as PNG (to a temp name first: never a half-written file)."""
    from pathlib import Path

    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    tmp.replace(path)
