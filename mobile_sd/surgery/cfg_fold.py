"""``cfg_fold`` (UNet): classifier-free guidance folded into the exported graph.

SnapFusion still runs guidance at inference, so every step needs the UNet on the conditional
and the unconditional text embeddings. Folding both into one batch-2 call and the guidance
arithmetic into the graph leaves the app one model call per step and one output to copy.

Before (app side, two calls)::

    eps_u = unet(x, t, uncond)                      eps_c = unet(x, t, cond)
    eps   = eps_u + scale * (eps_c - eps_u)         # on the CPU

After (one call of the wrapper)::

    CfgFoldedUNet(unet)(x, t, cond, uncond, scale):
        out = unet(cat[x, x], t (or cat[t, t]), cat[uncond, cond])   # batch 2B, one UNet call
        eps_u, eps_c = out.chunk(2)
        return eps_u + scale * (eps_c - eps_u)

The wrapped UNet is called as ``unet(sample, timestep, encoder_hidden_states)`` and may return
a tensor, a tuple (first item used) or an object with ``.sample`` (diffusers). ``apply`` returns
a new wrapper around the same (not copied) UNet; being a wrapper, it must be the last pass.
``guidance_scale`` is a tensor input (shape ``()``, ``(1,)`` or ``(B,)``), so one exported
program serves every scale.

Example (not run by the tests: it needs real artifacts)::

    folded = CfgFoldPass().apply(unet)
    eps = folded(sample, t, cond, uncond, torch.tensor([7.5]))
"""
from __future__ import annotations

import torch
from torch import nn

from mobile_sd.errors import RecipeError
from mobile_sd.surgery.base import SurgeryPass, unet_output


class CfgFoldedUNet(nn.Module):
    """``forward(sample, timestep, cond_embeddings, uncond_embeddings, guidance_scale)``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                cond_embeddings: torch.Tensor, uncond_embeddings: torch.Tensor,
                guidance_scale: torch.Tensor | float) -> torch.Tensor:
        # Unconditional first: the same order as diffusers' pipelines.
        context = torch.cat([uncond_embeddings, cond_embeddings])
        timesteps = timestep if timestep.ndim == 0 else torch.cat([timestep, timestep])
        out = unet_output(self.unet(torch.cat([sample, sample]), timesteps, context))
        uncond, cond = out.chunk(2)
        return uncond + _per_sample(guidance_scale, uncond) * (cond - uncond)


def _per_sample(scale: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    """A ``(B,)`` scale as ``(B, 1, 1, 1)`` so that each sample gets its own."""
    if isinstance(scale, torch.Tensor) and scale.ndim == 1:
        return scale.reshape(-1, *([1] * (like.ndim - 1)))
    return scale


class CfgFoldPass(SurgeryPass):
    """Wrap a UNet in :class:`CfgFoldedUNet` (see the module docstring)."""

    name = "cfg_fold"
    applies_to = frozenset({"unet"})
    returns_wrapper = True

    def apply(self, module: nn.Module) -> nn.Module:
        if isinstance(module, CfgFoldedUNet):
            raise RecipeError(f"{self.name}: the UNet is already folded; list 'cfg_fold' once")
        return CfgFoldedUNet(module)
