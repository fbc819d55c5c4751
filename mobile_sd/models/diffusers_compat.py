"""Translate between mobile-sd UNet specs and diffusers' ``UNet2DConditionModel`` configs.

SD-like topologies (every down stage pairs R and A blocks, diffusers' standard block types) can
be written as a diffusers config, so an ``sd15`` folder stays loadable by
``UNet2DConditionModel.from_pretrained``; and a user's trained SD-1.x folder (diffusers config)
loads into :class:`~mobile_sd.models.unet.EfficientUNet` without conversion.
"""
from __future__ import annotations

from typing import Any

from mobile_sd.errors import SpecError
from mobile_sd.models.spec import StageSpec, UNetSpec

_SUPPORTED_DOWN = {"CrossAttnDownBlock2D", "DownBlock2D"}
_SUPPORTED_UP = {"CrossAttnUpBlock2D", "UpBlock2D"}


def _per_block(value: Any, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def unet_spec_from_diffusers(config: dict[str, Any]) -> UNetSpec:
    """A :class:`UNetSpec` equal to a diffusers ``UNet2DConditionModel`` config (SD-1.x/2.x)."""
    down_types, up_types = config.get("down_block_types", ()), config.get("up_block_types", ())
    bad = sorted(set(down_types) - _SUPPORTED_DOWN | set(up_types) - _SUPPORTED_UP)
    if bad or config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise SpecError(f"unet/config.json: unsupported diffusers block types {bad or 'mid'}; "
                        "mobile-sd reads SD-1.x-style UNets (CrossAttn/plain Down/Up blocks)")
    for key, ok in (("addition_embed_type", None), ("class_embed_type", None),
                    ("time_embedding_type", "positional"), ("resnet_time_scale_shift", "default")):
        if config.get(key, ok) != ok:
            raise SpecError(f"unet/config.json: {key}={config[key]!r} is not supported "
                            f"(only {ok!r})")
    chans = list(config["block_out_channels"])
    n = len(chans)
    layers = _per_block(config.get("layers_per_block", 2), n)
    depth = _per_block(config.get("transformer_layers_per_block", 1), n)
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    if isinstance(heads, (list, tuple)):
        if len(set(heads)) != 1:
            raise SpecError("unet/config.json: per-block attention head counts are not supported")
        heads = heads[0]
    down = tuple(StageSpec(channels=chans[i], resnets=layers[i],
                           attentions=layers[i] if t.startswith("CrossAttn") else 0,
                           transformer_depth=depth[i], downsample=i < n - 1)
                 for i, t in enumerate(down_types))
    rchans, rlayers, rdepth = chans[::-1], layers[::-1], depth[::-1]
    up = tuple(StageSpec(channels=rchans[i], resnets=rlayers[i] + 1,
                         attentions=rlayers[i] + 1 if t.startswith("CrossAttn") else 0,
                         transformer_depth=rdepth[i], upsample=i < n - 1)
               for i, t in enumerate(up_types))
    mid = StageSpec(channels=chans[-1], resnets=2, attentions=1, transformer_depth=depth[-1])
    return UNetSpec(down=down, mid=mid, up=up, in_channels=config.get("in_channels", 4),
                    out_channels=config.get("out_channels", 4),
                    cross_attention_dim=config.get("cross_attention_dim", 768),
                    attention_heads=heads, norm_num_groups=config.get("norm_num_groups", 32),
                    norm_eps=config.get("norm_eps", 1e-5),
                    sample_size=config.get("sample_size", 64))


def diffusers_config_from_unet_spec(spec: UNetSpec) -> dict[str, Any] | None:
    """The diffusers config for ``spec``, or None when diffusers cannot express the topology."""
    n = len(spec.down)
    try:
        down_types = [_down_type(s) for s in spec.down]
        up_types = [_up_type(s) for s in spec.up]
    except ValueError:
        return None
    layers = [s.resnets for s in spec.down]
    expected_up = [(spec.down[n - 1 - i].channels, layers[n - 1 - i] + 1) for i in range(n)]
    same_mid = (spec.mid.resnets, spec.mid.attentions, spec.mid.order) == (2, 1, "RAR")
    if (len(spec.up) != n or [(s.channels, s.resnets) for s in spec.up] != expected_up
            or not same_mid or spec.mid.upsample
            or [s.downsample for s in spec.down] != [True] * (n - 1) + [False]
            or [s.upsample for s in spec.up] != [True] * (n - 1) + [False]):
        return None
    return {
        "_class_name": "UNet2DConditionModel",
        "in_channels": spec.in_channels, "out_channels": spec.out_channels,
        "block_out_channels": [s.channels for s in spec.down],
        "down_block_types": down_types, "up_block_types": up_types,
        "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "transformer_layers_per_block": [s.transformer_depth for s in spec.down],
        "cross_attention_dim": spec.cross_attention_dim,
        "attention_head_dim": spec.attention_heads,
        "norm_num_groups": spec.norm_num_groups, "norm_eps": spec.norm_eps,
        "sample_size": spec.sample_size, "act_fn": "silu", "flip_sin_to_cos": True,
        "freq_shift": 0, "center_input_sample": False, "downsample_padding": 1,
        "mid_block_scale_factor": 1, "use_linear_projection": False,
    }


def _down_type(stage: StageSpec) -> str:
    if stage.attentions == 0:
        return "DownBlock2D"
    if stage.attentions == stage.resnets and stage.order == "RA" * stage.resnets:
        return "CrossAttnDownBlock2D"
    raise ValueError(stage)


def _up_type(stage: StageSpec) -> str:
    return _down_type(stage).replace("Down", "Up")
