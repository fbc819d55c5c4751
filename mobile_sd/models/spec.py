"""Architecture specs: typed, frozen, loaded strictly from YAML (see ``mobile_sd/specs/``).

A spec describes the three trained components of a text-to-image model (UNet, text encoder,
image decoder) and its scheduler. The UNet is described per stage by counts (ResNet blocks,
cross-attention Transformer2D blocks and their depth), so SD-v1.5, SnapFusion's efficient UNet
and a user's own evolved variant are all data; :mod:`mobile_sd.models.unet` builds any of them.

>>> spec = load_spec("snapfusion-tiny")
>>> [s.attentions for s in spec.unet.down]
[0, 2, 2]
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

from mobile_sd.config import from_dict, load_yaml
from mobile_sd.errors import SpecError

RES, ATTN = "R", "A"


@dataclass(frozen=True)
class StageSpec:
    """One UNet stage at one resolution.

    ``layout`` is the order of blocks, e.g. ``"RARA"``; when omitted it follows the default
    rule of :func:`default_layout`.
    """
    channels: int
    resnets: int
    attentions: int = 0
    transformer_depth: int = 1
    layout: str | None = None
    downsample: bool = False
    upsample: bool = False

    def __post_init__(self) -> None:
        if self.channels <= 0 or self.resnets < 1 or self.attentions < 0:
            raise ValueError("need channels > 0, resnets >= 1, attentions >= 0 "
                             f"(got {self.channels}, {self.resnets}, {self.attentions})")
        if self.transformer_depth < 1:
            raise ValueError(f"transformer_depth must be >= 1, got {self.transformer_depth}")
        if self.layout is not None:
            if set(self.layout) - {RES, ATTN} or not self.layout.startswith(RES):
                raise ValueError(f"layout {self.layout!r}: use only 'R' and 'A', starting with 'R'")
            if (self.layout.count(RES), self.layout.count(ATTN)) != (self.resnets, self.attentions):
                raise ValueError(f"layout {self.layout!r} has {self.layout.count(RES)} R / "
                                 f"{self.layout.count(ATTN)} A but the stage declares "
                                 f"resnets={self.resnets}, attentions={self.attentions}")

    @property
    def order(self) -> str:
        return self.layout or default_layout(self.resnets, self.attentions)


def default_layout(resnets: int, attentions: int) -> str:
    """The block order used when a stage gives no ``layout``.

    Rule (SnapFusion does not publish the order inside Mid / Up-1; this one reproduces SD-v1.5
    exactly): with at least as many attention blocks as ResNets, each ResNet is followed by an
    equal share of them, the first ones taking the remainder (``2 R, 6 A -> RAAARAAA``); with
    fewer, attention blocks sit at evenly spaced points between ResNets (``2 R, 1 A -> RAR``,
    SD's mid block; ``4 R, 1 A -> RRARR``).

    >>> default_layout(2, 6), default_layout(4, 1), default_layout(2, 0)
    ('RAAARAAA', 'RRARR', 'RR')
    """
    after = [0] * resnets
    if attentions >= resnets:
        for i in range(resnets):
            after[i] = attentions // resnets + (1 if i < attentions % resnets else 0)
    else:
        for j in range(attentions):
            after[(j + 1) * resnets // (attentions + 1) - 1] += 1
    return "".join(RES + ATTN * n for n in after)


def _positive(**values) -> None:
    """Raise ``ValueError`` naming the first of ``values`` that is not > 0."""
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


@dataclass(frozen=True)
class UNetSpec:
    """The denoising UNet. Skip connections follow the rule in :mod:`mobile_sd.models.unet`.

    ``mid`` may be null: no mid block (BK-SDM-Small/Tiny, diffusers' ``mid_block_type: null``).
    """
    down: tuple[StageSpec, ...]
    mid: StageSpec | None
    up: tuple[StageSpec, ...]
    in_channels: int = 4
    out_channels: int = 4
    cross_attention_dim: int = 768
    attention_heads: int = 8
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    sample_size: int = 64

    @property
    def stages(self) -> tuple[StageSpec, ...]:
        """Down stages, the mid stage (when there is one), up stages."""
        return (*self.down, *((self.mid,) if self.mid is not None else ()), *self.up)

    def __post_init__(self) -> None:
        if not self.down or not self.up:
            raise ValueError("need at least one down and one up stage")
        _positive(in_channels=self.in_channels, out_channels=self.out_channels,
                  cross_attention_dim=self.cross_attention_dim,
                  attention_heads=self.attention_heads, norm_num_groups=self.norm_num_groups,
                  norm_eps=self.norm_eps, sample_size=self.sample_size)
        after_down = (*((self.mid,) if self.mid is not None else ()), *self.up)
        downs = sum(s.downsample for s in self.down)
        ups = sum(s.upsample for s in after_down)
        if downs != ups:
            raise ValueError(f"{downs} downsampling stages but {ups} upsampling stages; "
                             "the UNet must return to the input resolution")
        if any(s.upsample for s in self.down) or any(s.downsample for s in after_down):
            raise ValueError("down stages may only downsample, mid/up stages only upsample")
        for stage in self.stages:
            if stage.channels % self.norm_num_groups:
                raise ValueError(f"channels {stage.channels} not divisible by norm_num_groups "
                                 f"{self.norm_num_groups}")
            if stage.attentions and stage.channels % self.attention_heads:
                raise ValueError(f"channels {stage.channels} not divisible by attention_heads "
                                 f"{self.attention_heads}")
        if self.sample_size % (2 ** downs):
            raise ValueError(f"sample_size {self.sample_size} must be divisible by 2^{downs}")


@dataclass(frozen=True)
class TextEncoderSpec:
    """CLIP text tower (transformers ``CLIPTextModel``); ViT-L/14 in SD-v1.5 and SnapFusion."""
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    projection_dim: int = 768
    vocab_size: int = 49408
    max_length: int = 77
    hidden_act: Literal["quick_gelu", "gelu"] = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        _positive(hidden_size=self.hidden_size,
                  num_hidden_layers=self.num_hidden_layers,
                  num_attention_heads=self.num_attention_heads,
                  intermediate_size=self.intermediate_size, projection_dim=self.projection_dim,
                  vocab_size=self.vocab_size, max_length=self.max_length,
                  layer_norm_eps=self.layer_norm_eps)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")


@dataclass(frozen=True)
class DecoderSpec:
    """The image decoder: SD's VAE decoder or a narrower distilled one (same latent interface).

    ``format: vae`` writes a complete diffusers ``AutoencoderKL`` (encoder included) into
    ``vae/``; ``format: decoder`` writes only the decoder into ``vae_decoder/``.
    """
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    out_channels: int = 3
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    format: Literal["vae", "decoder"] = "vae"

    def __post_init__(self) -> None:
        if not self.block_out_channels:
            raise ValueError("block_out_channels must not be empty")
        _positive(layers_per_block=self.layers_per_block,
                  latent_channels=self.latent_channels, out_channels=self.out_channels,
                  norm_num_groups=self.norm_num_groups, scaling_factor=self.scaling_factor)
        for channels in self.block_out_channels:
            _positive(block_out_channels=channels)
            if channels % self.norm_num_groups:
                raise ValueError(f"block_out_channels {channels} not divisible by "
                                 f"norm_num_groups {self.norm_num_groups}")

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel along each side: ``2 ** (len(block_out_channels) - 1)``
        (diffusers' ``vae_scale_factor``; 8 for SD's VAE and SnapFusion's decoder)."""
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class SchedulerSpec:
    """DDIM settings (written as a diffusers ``DDIMScheduler`` config)."""
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    timestep_spacing: Literal["leading", "trailing", "linspace"] = "leading"
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: Literal["scaled_linear", "linear"] = "scaled_linear"
    steps_offset: int = 1
    default_steps: int = 8
    default_guidance: float = 4.5

    def __post_init__(self) -> None:
        _positive(num_train_timesteps=self.num_train_timesteps,
                  default_steps=self.default_steps)
        if self.steps_offset < 0 or not 0 <= self.beta_start <= self.beta_end < 1:
            raise ValueError("need steps_offset >= 0 and 0 <= beta_start <= beta_end < 1 (got "
                             f"{self.steps_offset}, {self.beta_start}, {self.beta_end})")


@dataclass(frozen=True)
class ModelSpec:
    """A whole text-to-image model."""
    name: str
    unet: UNetSpec
    description: str = ""
    text_encoder: TextEncoderSpec = field(default_factory=TextEncoderSpec)
    decoder: DecoderSpec = field(default_factory=DecoderSpec)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    seed: int = 0
    notes: str = ""

    @property
    def vae_scale_factor(self) -> int:
        """Image size / latent size (``decoder.vae_scale_factor``; 8 for SD-style decoders)."""
        return self.decoder.vae_scale_factor

    @property
    def image_size(self) -> int:
        """Side of the images the model makes at its UNet's ``sample_size``."""
        return self.unet.sample_size * self.vae_scale_factor


def _spec_dir() -> Path:
    return Path(str(resources.files("mobile_sd") / "specs"))


def list_specs() -> list[str]:
    """Names of the specs shipped with mobile-sd."""
    return sorted(p.stem for p in _spec_dir().glob("*.yaml"))


@lru_cache(maxsize=None)
def load_spec(name_or_path: str) -> ModelSpec:
    """Load a shipped spec by name (``snapfusion``) or a user's spec YAML by path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = _spec_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise SpecError(f"unknown spec {name_or_path!r}; valid specs: "
                            f"{', '.join(list_specs())} (or a path to a spec .yaml)")
    return from_dict(ModelSpec, load_yaml(path), where=path.name)


def replace_unet(spec: ModelSpec, **changes) -> ModelSpec:
    """A copy of ``spec`` with some UNet fields changed (used for sample-size overrides)."""
    return dataclasses.replace(spec, unet=dataclasses.replace(spec.unet, **changes))
