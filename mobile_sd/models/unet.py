"""One UNet module for every spec: SD-v1.5, SnapFusion's efficient UNet, users' variants.

Built from diffusers' blocks (``ResnetBlock2D``, ``Transformer2DModel``, ``Downsample2D``,
``Upsample2D``) and named like diffusers' ``UNet2DConditionModel`` (``down_blocks.i.resnets.j``,
``mid_block.attentions.0``...), so an SD-v1.5 checkpoint loads unchanged and the graph-surgery
passes written for diffusers attention apply.

Skip-connection rule (SnapFusion leaves it open once ResNets are removed): conv_in, every down
ResNet (after the attention blocks that follow it) and every downsampler push their output onto
the skip list of *their resolution level*; in an up stage each ResNet pops the most recent skip of
the level the stage runs at. Skips nobody pops (SnapFusion's 8x8 downsampler output, which is
also the Mid input) are simply unused. For SD-v1.5 this rule is exactly diffusers' wiring.
"""
from __future__ import annotations

import torch
from torch import nn

from mobile_sd.models.spec import ATTN, RES, StageSpec, UNetSpec


class UNetStage(nn.Module):
    """ResNets and Transformer2D blocks in ``spec.order``, then an optional down/upsampler."""

    def __init__(self, spec: StageSpec, in_channels: int, skip_channels: list[int],
                 unet: UNetSpec, temb_channels: int) -> None:
        from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        super().__init__()
        self.order = spec.order
        self.pops_skips = bool(skip_channels)
        self.resnets = nn.ModuleList()
        channels = in_channels
        for i in range(spec.resnets):
            extra = skip_channels[i] if skip_channels else 0
            self.resnets.append(ResnetBlock2D(
                in_channels=channels + extra, out_channels=spec.channels,
                temb_channels=temb_channels, eps=unet.norm_eps, groups=unet.norm_num_groups))
            channels = spec.channels
        heads = unet.attention_heads
        self.attentions = nn.ModuleList(
            Transformer2DModel(heads, spec.channels // heads, in_channels=spec.channels,
                               num_layers=spec.transformer_depth,
                               cross_attention_dim=unet.cross_attention_dim,
                               norm_num_groups=unet.norm_num_groups)
            for _ in range(spec.attentions))
        if spec.downsample:
            self.downsamplers = nn.ModuleList([Downsample2D(
                spec.channels, use_conv=True, out_channels=spec.channels, padding=1, name="op")])
        if spec.upsample:
            self.upsamplers = nn.ModuleList([Upsample2D(
                spec.channels, use_conv=True, out_channels=spec.channels)])

    def forward(self, hidden: torch.Tensor, temb: torch.Tensor, context: torch.Tensor,
                skips: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the stage. Up stages pop from ``skips``; down stages return the skips they push."""
        pushed: list[torch.Tensor] = []
        res_i = attn_i = 0
        for pos, kind in enumerate(self.order):
            if kind == RES:
                if self.pops_skips:
                    hidden = torch.cat([hidden, skips.pop()], dim=1)
                hidden = self.resnets[res_i](hidden, temb)
                res_i += 1
            else:
                hidden = self.attentions[attn_i](hidden, encoder_hidden_states=context,
                                                 return_dict=False)[0]
                attn_i += 1
            if pos + 1 == len(self.order) or self.order[pos + 1] == RES:
                pushed.append(hidden)
        if hasattr(self, "downsamplers"):
            hidden = self.downsamplers[0](hidden)
            pushed.append(hidden)
        if hasattr(self, "upsamplers"):
            hidden = self.upsamplers[0](hidden)
        return hidden, pushed


def skip_plan(spec: UNetSpec) -> tuple[list[list[int]], list[int]]:
    """Channels of the skips each up stage pops (in pop order), and levels of unused skips.

    Raises ``ValueError`` when an up stage has more ResNets than skips at its level.
    """
    levels: dict[int, list[int]] = {0: [spec.down[0].channels]}  # conv_in output
    level = 0
    for stage in spec.down:
        levels.setdefault(level, []).extend([stage.channels] * stage.resnets)
        if stage.downsample:
            level += 1
            levels.setdefault(level, []).append(stage.channels)
    level -= spec.mid is not None and spec.mid.upsample
    plan = []
    for i, stage in enumerate(spec.up):
        stack = levels.get(level, [])
        if len(stack) < stage.resnets:
            raise ValueError(f"up stage {i} has {stage.resnets} ResNets but only {len(stack)} "
                             f"skip connection(s) exist at its resolution level {level}")
        plan.append([stack.pop() for _ in range(stage.resnets)])
        level -= stage.upsample
    unused = [lvl for lvl, stack in levels.items() for _ in stack]
    return plan, unused


class EfficientUNet(nn.Module):
    """Text-conditioned UNet built from a :class:`UNetSpec`.

    ``forward(sample [B,4,H,W], timestep [B] or scalar, encoder_hidden_states [B,77,D])``
    returns the model prediction (epsilon or v, per the scheduler), shape of ``sample``.
    """

    def __init__(self, spec: UNetSpec) -> None:
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        super().__init__()
        self.spec = spec
        first = spec.down[0].channels
        temb = first * 4
        self.conv_in = nn.Conv2d(spec.in_channels, first, kernel_size=3, padding=1)
        self.time_proj = Timesteps(first, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(first, temb)
        plan, _ = skip_plan(spec)
        channels = first
        self.down_blocks = nn.ModuleList()
        for stage in spec.down:
            self.down_blocks.append(UNetStage(stage, channels, [], spec, temb))
            channels = stage.channels
        # No mid block (BK-SDM-Small/Tiny): None, like diffusers' ``mid_block_type=None``.
        self.mid_block = (UNetStage(spec.mid, channels, [], spec, temb)
                          if spec.mid is not None else None)
        channels = spec.mid.channels if spec.mid is not None else channels
        self.up_blocks = nn.ModuleList()
        for stage, skips in zip(spec.up, plan):
            self.up_blocks.append(UNetStage(stage, channels, skips, spec, temb))
            channels = stage.channels
        self.conv_norm_out = nn.GroupNorm(spec.norm_num_groups, channels, eps=spec.norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels, spec.out_channels, kernel_size=3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1)
        timestep = timestep.expand(sample.shape[0])
        temb = self.time_embedding(self.time_proj(timestep).to(sample.dtype))
        hidden = self.conv_in(sample)
        level, skips = 0, {0: [hidden]}
        for block in self.down_blocks:
            before = level
            hidden, pushed = block(hidden, temb, encoder_hidden_states)
            if hasattr(block, "downsamplers"):
                level += 1
                skips.setdefault(before, []).extend(pushed[:-1])
                skips.setdefault(level, []).append(pushed[-1])
            else:
                skips.setdefault(before, []).extend(pushed)
        if self.mid_block is not None:
            hidden, _ = self.mid_block(hidden, temb, encoder_hidden_states)
            level -= hasattr(self.mid_block, "upsamplers")
        for block in self.up_blocks:
            hidden, _ = block(hidden, temb, encoder_hidden_states, skips[level])
            level -= hasattr(block, "upsamplers")
        return self.conv_out(self.conv_act(self.conv_norm_out(hidden)))
