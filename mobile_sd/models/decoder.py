"""The image decoder: SD's VAE decoder or SnapFusion's 50%-channel distilled decoder.

Both share the latent interface (4 channels, scaling factor 0.18215) and diffusers' key names
(``post_quant_conv.*``, ``decoder.*``), so the decoder half of any SD ``AutoencoderKL`` loads as is.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mobile_sd.errors import SpecError
from mobile_sd.models.spec import DecoderSpec


class ImageDecoder(nn.Module):
    """``forward(z) -> image`` with ``z = latents / scaling_factor`` and the image in [-1, 1]."""

    def __init__(self, spec: DecoderSpec) -> None:
        from diffusers.models.autoencoders.vae import Decoder

        super().__init__()
        self.spec = spec
        self.post_quant_conv = nn.Conv2d(spec.latent_channels, spec.latent_channels, 1)
        self.decoder = Decoder(
            in_channels=spec.latent_channels, out_channels=spec.out_channels,
            up_block_types=("UpDecoderBlock2D",) * len(spec.block_out_channels),
            block_out_channels=spec.block_out_channels, layers_per_block=spec.layers_per_block,
            norm_num_groups=spec.norm_num_groups, act_fn="silu", mid_block_add_attention=True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


def autoencoder_config(spec: DecoderSpec) -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` config whose decoder half is ``ImageDecoder(spec)``."""
    n = len(spec.block_out_channels)
    return {"_class_name": "AutoencoderKL", "in_channels": spec.out_channels,
            "out_channels": spec.out_channels, "latent_channels": spec.latent_channels,
            "block_out_channels": list(spec.block_out_channels),
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "layers_per_block": spec.layers_per_block, "norm_num_groups": spec.norm_num_groups,
            "act_fn": "silu", "scaling_factor": spec.scaling_factor, "sample_size": 512}


def decoder_spec_from_autoencoder(config: dict[str, Any],
                                  where: str = "vae/config.json") -> DecoderSpec:
    """The :class:`DecoderSpec` of a diffusers ``AutoencoderKL`` config (its decoder half)."""
    from mobile_sd.config import from_dict

    if not isinstance(config, dict):
        raise SpecError(f"{where}: expected a JSON object, got {type(config).__name__}")
    if "block_out_channels" not in config:
        raise SpecError(f"{where}: missing required key 'block_out_channels'")
    up_types = config.get("up_block_types", ["UpDecoderBlock2D"])
    if not isinstance(up_types, list) or set(map(str, up_types)) != {"UpDecoderBlock2D"}:
        raise SpecError(f"{where}: up_block_types {up_types!r} not supported "
                        "(only UpDecoderBlock2D)")
    body = {"block_out_channels": config["block_out_channels"],
            "layers_per_block": config.get("layers_per_block", 2),
            "latent_channels": config.get("latent_channels", 4),
            "out_channels": config.get("out_channels", 3),
            "norm_num_groups": config.get("norm_num_groups", 32),
            "scaling_factor": config.get("scaling_factor", 0.18215), "format": "vae"}
    return from_dict(DecoderSpec, body, where=where)


def build_autoencoder(spec: DecoderSpec):
    """A full diffusers ``AutoencoderKL`` (encoder too) for writing a standard ``vae/`` folder."""
    from diffusers import AutoencoderKL

    config = {k: v for k, v in autoencoder_config(spec).items() if not k.startswith("_")}
    return AutoencoderKL(**config)
