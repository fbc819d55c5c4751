"""Translate between mobile-sd UNet specs and diffusers' ``UNet2DConditionModel`` configs.

SD-like topologies (every down stage pairs R and A blocks, diffusers' standard block types) can
be written as a diffusers config, so an ``sd15`` folder stays loadable by
``UNet2DConditionModel.from_pretrained``; and a user's trained SD-1.x folder (diffusers config)
loads into :class:`~mobile_sd.models.unet.EfficientUNet` without conversion.
"""
from __future__ import annotations

from typing import Any

from mobile_sd.config import from_dict
from mobile_sd.errors import SpecError
from mobile_sd.models.spec import StageSpec, UNetSpec

_SUPPORTED_DOWN = {"CrossAttnDownBlock2D", "DownBlock2D"}
_SUPPORTED_UP = {"CrossAttnUpBlock2D", "UpBlock2D"}
#: mid_block_type -> (resnets, attentions) of the mid stage; None: no mid block (BK-SDM).
_SUPPORTED_MID = {"UNetMidBlock2DCrossAttn": (2, 1), "UNetMidBlock2D": (1, 0), None: None}
#: Config keys whose non-default values change the network (weights or numerics) in ways
#: EfficientUNet does not build: refused rather than silently computed differently.
_ONLY_DEFAULT = {
    "addition_embed_type": None, "class_embed_type": None, "num_class_embeds": None,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "time_cond_proj_dim": None,
    "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0,
    "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "use_linear_projection": False,
    "upcast_attention": False, "only_cross_attention": False, "dual_cross_attention": False,
    "attention_type": "default", "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None, "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
}


def _per_block(value: Any, n: int, key: str, where: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise SpecError(f"{where}: {key} has {len(value)} entries for {n} blocks")
        return list(value)
    return [value] * n


def _names(value: Any, key: str, where: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise SpecError(f"{where}: {key} must be a list of block type names, got {value!r}")
    return list(value)


def unet_spec_from_diffusers(config: dict[str, Any],
                             where: str = "unet/config.json") -> UNetSpec:
    """A :class:`UNetSpec` equal to a diffusers ``UNet2DConditionModel`` config.

    SD-1.x-style UNets, and what diffusers' config expresses of their pruned variants (BK-SDM):
    ``mid_block_type`` null or ``UNetMidBlock2D``, ``layers_per_block`` / ``transformer_layers_per_block``
    as an int or one entry per block, any number of down/up blocks. Raises :class:`SpecError`
    naming ``where`` for anything else.
    """
    if not isinstance(config, dict):
        raise SpecError(f"{where}: expected a JSON object, got {type(config).__name__}")
    down_types = _names(config.get("down_block_types", ()), "down_block_types", where)
    up_types = _names(config.get("up_block_types", ()), "up_block_types", where)
    bad = sorted(set(down_types) - _SUPPORTED_DOWN | set(up_types) - _SUPPORTED_UP)
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if bad or not isinstance(mid_type, (str, type(None))) or mid_type not in _SUPPORTED_MID:
        raise SpecError(f"{where}: unsupported diffusers block types "
                        f"{bad or f'mid_block_type={mid_type!r}'}; mobile-sd reads SD-1.x-style "
                        "UNets (CrossAttn/plain Down/Up blocks; mid block UNetMidBlock2DCrossAttn, "
                        "UNetMidBlock2D or null)")
    for key, ok in _ONLY_DEFAULT.items():
        value = config.get(key, ok)
        if value != ok and not (isinstance(value, list) and all(v == ok for v in value)):
            raise SpecError(f"{where}: {key}={value!r} is not supported (only {ok!r})")
    chans = config.get("block_out_channels")
    if not isinstance(chans, (list, tuple)) or not chans:
        raise SpecError(f"{where}: block_out_channels must be a non-empty list, got {chans!r}")
    n = len(chans)
    if (len(down_types), len(up_types)) != (n, n):
        raise SpecError(f"{where}: {len(down_types)} down_block_types and {len(up_types)} "
                        f"up_block_types for {n} block_out_channels; they must be equal")
    layers = _per_block(config.get("layers_per_block", 2), n, "layers_per_block", where)
    depth = _per_block(config.get("transformer_layers_per_block", 1), n,
                       "transformer_layers_per_block", where)
    heads = _same_for_all(config.get("num_attention_heads") or config.get("attention_head_dim", 8),
                          "attention_head_dim", where)
    cross = _same_for_all(config.get("cross_attention_dim", 1280), "cross_attention_dim", where)

    def stage(c, r, a, d, **updown):
        return {"channels": c, "resnets": r, "attentions": a, "transformer_depth": d, **updown}

    def plus_one(x):  # up blocks have one ResNet more than their down block (left for from_dict)
        return x + 1 if isinstance(x, int) and not isinstance(x, bool) else x

    down = [stage(chans[i], layers[i], layers[i] if t.startswith("CrossAttn") else 0, depth[i],
                  downsample=i < n - 1) for i, t in enumerate(down_types)]
    rchans, rlayers, rdepth = chans[::-1], layers[::-1], depth[::-1]
    up = [stage(rchans[i], plus_one(rlayers[i]),
                plus_one(rlayers[i]) if t.startswith("CrossAttn") else 0, rdepth[i],
                upsample=i < n - 1) for i, t in enumerate(up_types)]
    mid = None
    if _SUPPORTED_MID[mid_type] is not None:
        resnets, attentions = _SUPPORTED_MID[mid_type]
        mid = stage(chans[-1], resnets, attentions, depth[-1])
    body = {"down": down, "mid": mid, "up": up}
    for key in ("in_channels", "out_channels", "norm_num_groups", "norm_eps", "sample_size"):
        if key in config and not (key == "sample_size" and config[key] is None):
            body[key] = config[key]
    body.update(cross_attention_dim=cross, attention_heads=heads)
    return from_dict(UNetSpec, body, where=where)


def _same_for_all(value: Any, key: str, where: str) -> Any:
    """diffusers allows one value per block for some keys; mobile-sd one for the whole UNet."""
    if not isinstance(value, (list, tuple)):
        return value
    if not value or any(v != value[0] for v in value):
        raise SpecError(f"{where}: per-block {key} {list(value)!r} is not supported "
                        "(one value for all blocks)")
    return value[0]


def diffusers_config_from_unet_spec(spec: UNetSpec) -> dict[str, Any] | None:
    """The diffusers config for ``spec``, or None when diffusers cannot express the topology."""
    n = len(spec.down)
    try:
        down_types = [_down_type(s) for s in spec.down]
        up_types = [_up_type(s) for s in spec.up]
    except ValueError:
        return None
    layers = [s.resnets for s in spec.down]
    depth = [s.transformer_depth for s in spec.down]
    expected_up = [(spec.down[n - 1 - i].channels, layers[n - 1 - i] + 1, depth[n - 1 - i])
                   for i in range(n)]
    mid_type = _mid_type(spec.mid, spec.down[-1])
    if (len(spec.up) != n or mid_type is False
            or [(s.channels, s.resnets, s.transformer_depth) for s in spec.up] != expected_up
            or [s.downsample for s in spec.down] != [True] * (n - 1) + [False]
            or [s.upsample for s in spec.up] != [True] * (n - 1) + [False]):
        return None
    return {
        "_class_name": "UNet2DConditionModel",
        "in_channels": spec.in_channels, "out_channels": spec.out_channels,
        "block_out_channels": [s.channels for s in spec.down],
        "down_block_types": down_types, "mid_block_type": mid_type, "up_block_types": up_types,
        "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "transformer_layers_per_block": depth,
        "cross_attention_dim": spec.cross_attention_dim,
        "attention_head_dim": spec.attention_heads,
        "norm_num_groups": spec.norm_num_groups, "norm_eps": spec.norm_eps,
        "sample_size": spec.sample_size, "act_fn": "silu", "flip_sin_to_cos": True,
        "freq_shift": 0, "center_input_sample": False, "downsample_padding": 1,
        "mid_block_scale_factor": 1, "use_linear_projection": False,
    }


def _mid_type(mid: StageSpec | None, last_down: StageSpec) -> str | None | bool:
    """diffusers' ``mid_block_type`` for ``mid`` (None: no mid block), False if it has none."""
    if mid is None:
        return None
    if mid.upsample or mid.channels != last_down.channels:
        return False
    if (mid.resnets, mid.attentions, mid.order) == (2, 1, "RAR"):
        return ("UNetMidBlock2DCrossAttn" if mid.transformer_depth == last_down.transformer_depth
                else False)
    if (mid.resnets, mid.attentions) == (1, 0):
        return "UNetMidBlock2D"
    return False


def _down_type(stage: StageSpec) -> str:
    if stage.attentions == 0:
        return "DownBlock2D"
    if stage.attentions == stage.resnets and stage.order == "RA" * stage.resnets:
        return "CrossAttnDownBlock2D"
    raise ValueError(stage)


def _up_type(stage: StageSpec) -> str:
    return _down_type(stage).replace("Down", "Up")
