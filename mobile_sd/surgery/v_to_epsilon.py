"""``v_to_epsilon`` (UNet): a v-prediction UNet wrapped so that it outputs epsilon.

Apple's StableDiffusion Swift package (apple/ml-stable-diffusion) only has epsilon schedulers
(``PNDMScheduler`` and ``DPMSolverMultistepScheduler``, whose ``convertModelOutput`` computes
``x0 = (x - sigma_t * eps) / alpha_t``) and no prediction-type option, so a v-prediction UNet
(SnapFusion) runs there but makes wrong images. This pass moves the conversion into the graph.

With ``x_t = a x0 + s eps``, ``v = a eps - s x0``, ``a = sqrt(alpha_bar_t)``,
``s = sqrt(1 - alpha_bar_t)`` (so ``a^2 + s^2 = 1``)::

    eps = a * v + s * x_t

The conversion is affine in ``v`` with coefficients that depend only on ``t`` (the same for the
conditional and unconditional halves of the batch), so the app's classifier-free guidance on the
converted outputs equals guidance on v, then converted: the app's CFG stays exact.

Before::

    noise_pred = unet(sample, timestep, encoder_hidden_states)           # v

After (``VToEpsilonUNet(unet, sqrt_alpha_bar, sqrt_one_minus_alpha_bar)``)::

    v   = unet(sample, timestep, encoder_hidden_states)
    t   = clamp(round(timestep), 0, T - 1)                                # the app sends floats
    hot = (arange(T) == t[:, None]).to(v.dtype)                           # [B, T] one-hot
    a   = (hot * sqrt_alpha_bar).sum(1).reshape(B, 1, 1, 1)               # constant [T] tables
    s   = (hot * sqrt_one_minus_alpha_bar).sum(1).reshape(B, 1, 1, 1)
    return a * v + s * sample                                             # epsilon

The tables (``T = num_train_timesteps`` entries, computed in float64 from the training beta
schedule, stored as float32 buffers) are looked up **inside the graph** from the timestep input,
so one exported program serves every step. The lookup is a one-hot product, not a gather:
coremltools lowers a gather's int32 index to uint16 for iOS17+, and its ``bisect_model`` (which
splits a large UNet into the Swift app's two chunks) then fails to rebuild that cast. Every op
(``round``, ``clip``, ``equal``, ``cast``, ``mul``, ``reduce_sum``, ``reshape``, ``add``) is in
coremltools' torch frontend and exports with static shapes through ``torch.export``; the sum
has one non-zero term, so the lookup is exact in fp16 too. The Swift app sends the timestep as float32 ``[2]``
holding an integer (``Unet.swift``, ``predictNoise``: ``Float(timeStep)``); integers up to 2048
are exact in fp16 too, so fp16 compute does not move the lookup.

Prediction types: ``v_prediction`` is wrapped; ``epsilon`` passes through untouched (the same
module is returned); ``sample`` (x0) is refused: the Swift app's schedulers (PNDM,
DPM-Solver++) take epsilon only. The wrapper keeps the forward signature; it is listed as a
wrapper (``returns_wrapper``) because it changes what the output means, so it goes last in a
pass list (parity's "original" applies it too), e.g. ``["linear_to_conv", "split_einsum_v2",
"v_to_epsilon"]``.

>>> p = VToEpsilonPass.for_spec(load_spec("snapfusion").scheduler)      # doctest: +SKIP
>>> eps_unet = p.apply(model.unet)                                      # doctest: +SKIP
"""
from __future__ import annotations

import math

import torch
from torch import nn

from mobile_sd.errors import RecipeError
from mobile_sd.surgery.base import SurgeryPass, unet_output

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("scaled_linear", "linear")
SWIFT_PREDICTION_TYPES = ("epsilon", "v_prediction")  # what this pass can hand to the Swift app


def alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                   beta_end: float = 0.012, beta_schedule: str = "scaled_linear") -> torch.Tensor:
    """``alpha_bar_t`` for t = 0..T-1 in float64 (diffusers' and the Swift package's formula:
    ``scaled_linear`` betas = linspace(sqrt(start), sqrt(end), T)^2, ``linear`` = linspace)."""
    if beta_schedule not in BETA_SCHEDULES:
        raise RecipeError(f"v_to_epsilon: beta_schedule must be one of {', '.join(BETA_SCHEDULES)}"
                          f" (the ones the Swift package implements), got {beta_schedule!r}")
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) \
            or num_train_timesteps < 2:
        raise RecipeError(f"v_to_epsilon: num_train_timesteps must be an int >= 2, "
                          f"got {num_train_timesteps!r}")
    if beta_schedule == "scaled_linear":
        betas = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_train_timesteps,
                               dtype=torch.float64) ** 2
    else:
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


class VToEpsilonUNet(nn.Module):
    """``forward(sample, timestep, encoder_hidden_states) -> epsilon`` around a v-prediction UNet.

    ``timestep`` is ``()``, ``(1,)`` or ``(B,)`` (float or int); the wrapped UNet gets it
    unchanged. The lookup tables are non-persistent buffers (not in the state dict)."""

    def __init__(self, unet: nn.Module, alpha_bar: torch.Tensor):
        super().__init__()
        self.unet = unet
        alpha_bar = alpha_bar.to(torch.float64)
        self.num_train_timesteps = int(alpha_bar.numel())
        self.register_buffer("sqrt_alpha_bar", alpha_bar.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_one_minus_alpha_bar", (1.0 - alpha_bar).sqrt().float(),
                             persistent=False)
        self.register_buffer("train_steps", torch.arange(self.num_train_timesteps,
                                                         dtype=torch.float32), persistent=False)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        v = unet_output(self.unet(sample, timestep, encoder_hidden_states))
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).float()
        t = torch.clamp(torch.round(t), 0, self.num_train_timesteps - 1)
        hot = (self.train_steps[None, :] == t[:, None]).to(torch.float32)   # [B, T] one-hot
        shape = (-1,) + (1,) * (sample.ndim - 1)
        a = (hot * self.sqrt_alpha_bar).sum(1).reshape(shape).to(v.dtype)
        s = (hot * self.sqrt_one_minus_alpha_bar).sum(1).reshape(shape).to(v.dtype)
        return a * v + s * sample


class VToEpsilonPass(SurgeryPass):
    """Wrap a v-prediction UNet in :class:`VToEpsilonUNet` (see the module docstring).

    Options: ``prediction_type`` (what the UNet predicts; default ``v_prediction``, SnapFusion)
    and the training noise schedule ``num_train_timesteps``, ``beta_start``, ``beta_end``,
    ``beta_schedule`` (defaults: SD's, which SnapFusion and the Swift package use)."""

    name = "v_to_epsilon"
    # Changes what the output means (v -> epsilon) but not the sampler's trajectory: an epsilon
    # scheduler on the wrapper steps exactly as a v scheduler on the UNet (cf. cfg_fold).
    preserves_numerics = True
    applies_to = frozenset({"unet"})
    returns_wrapper = True

    def __init__(self, prediction_type: str = "v_prediction", num_train_timesteps: int = 1000,
                 beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear"):
        if prediction_type == "sample":
            raise RecipeError(
                "v_to_epsilon: the UNet predicts 'sample' (x0), which Apple's Swift app cannot "
                "use: its schedulers (PNDM and DPM-Solver++) take epsilon only. Export an "
                "'epsilon' UNet, or a 'v_prediction' UNet through this pass")
        if prediction_type not in PREDICTION_TYPES:
            raise RecipeError(f"v_to_epsilon: prediction_type must be one of "
                              f"{', '.join(SWIFT_PREDICTION_TYPES)}, got {prediction_type!r}")
        self.prediction_type = prediction_type
        self.alpha_bar = alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule)

    @classmethod
    def for_spec(cls, scheduler_spec) -> "VToEpsilonPass":
        """The pass for a :class:`~mobile_sd.models.spec.SchedulerSpec` (or a ModelSpec)."""
        spec = getattr(scheduler_spec, "scheduler", scheduler_spec)
        return cls(spec.prediction_type, spec.num_train_timesteps, spec.beta_start,
                   spec.beta_end, spec.beta_schedule)

    def apply(self, module: nn.Module) -> nn.Module:
        if isinstance(module, VToEpsilonUNet):
            raise RecipeError(f"{self.name}: the UNet already outputs epsilon; list "
                              f"'v_to_epsilon' once")
        if self.prediction_type == "epsilon":
            return module
        return VToEpsilonUNet(module, self.alpha_bar)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(prediction_type={self.prediction_type!r})"
