"""Build a whole model from a spec with seeded random weights.

The default model of mobile-sd is the full-size SnapFusion architecture with seeded random
weights: no pretrained weights can be downloaded here, so images it makes are noise. Point the
tools at a trained folder (``--model DIR``) for real images.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mobile_sd.models.decoder import ImageDecoder
from mobile_sd.models.spec import ModelSpec, load_spec
from mobile_sd.models.text_encoder import build_clip
from mobile_sd.models.unet import EfficientUNet

# Each component gets its own seed offset so building one does not depend on building another.
SEED_OFFSETS = {"unet": 0, "text_encoder": 1, "decoder": 2}


@dataclass
class Model:
    """The trained (or random) components of a text-to-image model, in fp32 eval mode."""
    spec: ModelSpec
    unet: EfficientUNet
    text_encoder: nn.Module  # transformers CLIPTextModel
    decoder: ImageDecoder
    tokenizer: Any = None
    source: str = ""
    extra: dict = field(default_factory=dict)
    #: Per component, the dtype its weights were stored in before loading upcast them to fp32
    #: (``float16``, ``bfloat16``, ``float32``; ``float16+float32`` when a file mixes them).
    stored_dtypes: dict[str, str] = field(
        default_factory=lambda: dict.fromkeys(SEED_OFFSETS, "float32"))
    #: The weights variant read (``fp16``...), per component; None: plain files or built.
    variants: dict[str, str | None] = field(default_factory=lambda: dict.fromkeys(SEED_OFFSETS))

    @property
    def stored_dtype(self) -> str:
        """One word for manifests: the common stored dtype, or ``mixed`` when they differ."""
        kinds = set(self.stored_dtypes.values())
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def components(self) -> dict[str, nn.Module]:
        return {"text_encoder": self.text_encoder, "unet": self.unet, "decoder": self.decoder}


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def build_component(spec: ModelSpec, name: str, seed: int | None = None) -> nn.Module:
    """One component of ``spec`` with seeded random weights (``unet``/``text_encoder``/``decoder``)."""
    base = spec.seed if seed is None else seed
    builders = {"unet": lambda: EfficientUNet(spec.unet),
                "text_encoder": lambda: build_clip(spec.text_encoder),
                "decoder": lambda: ImageDecoder(spec.decoder)}
    return _seeded(base + SEED_OFFSETS[name], builders[name])


def build_model(spec: ModelSpec | str, seed: int | None = None, with_tokenizer: bool = True) -> Model:
    """All components of ``spec`` with seeded random weights (and the real CLIP tokenizer)."""
    spec = load_spec(spec) if isinstance(spec, str) else spec
    parts = {name: build_component(spec, name, seed) for name in SEED_OFFSETS}
    tokenizer = None
    if with_tokenizer:
        from mobile_sd.models.tokenizer import default_tokenizer

        tokenizer = default_tokenizer(spec.text_encoder.max_length)
    seed = spec.seed if seed is None else seed
    return Model(spec=spec, tokenizer=tokenizer,
                 source=f"spec {spec.name} (seeded random weights, seed {seed})", **parts)
