"""Tiny models several test files build the same way."""
from __future__ import annotations

import torch
from torch import nn


def diffusers_tiny_unet() -> nn.Module:
    """A 2-level diffusers UNet2DConditionModel (32/64 channels, one cross-attention level) with
    the plain attention processor, seeded, in eval mode."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=4, norm_num_groups=8, sample_size=16).eval()
    unet.set_attn_processor(AttnProcessor())
    return unet
