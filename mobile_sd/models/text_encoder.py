"""The CLIP text encoder (transformers ``CLIPTextModel``) built from a :class:`TextEncoderSpec`."""
from __future__ import annotations

import torch
from torch import nn

from mobile_sd.models.spec import TextEncoderSpec

BOS_ID, EOS_ID = 49406, 49407


def clip_config(spec: TextEncoderSpec):
    """transformers ``CLIPTextConfig`` for ``spec`` (ViT-L/14's text tower by default)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, projection_dim=spec.projection_dim,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        max_position_embeddings=spec.max_length, hidden_act=spec.hidden_act,
        layer_norm_eps=spec.layer_norm_eps, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        pad_token_id=EOS_ID, attn_implementation="eager")


def spec_from_clip_config(config: dict) -> TextEncoderSpec:
    """Inverse of :func:`clip_config`, for a user's ``text_encoder/config.json``."""
    return TextEncoderSpec(
        hidden_size=config["hidden_size"], num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        intermediate_size=config["intermediate_size"],
        projection_dim=config.get("projection_dim", config["hidden_size"]),
        vocab_size=config.get("vocab_size", 49408),
        max_length=config.get("max_position_embeddings", 77),
        hidden_act=config.get("hidden_act", "quick_gelu"),
        layer_norm_eps=config.get("layer_norm_eps", 1e-5))


def build_clip(spec: TextEncoderSpec):
    """A randomly initialised ``CLIPTextModel`` (eager attention: exportable everywhere)."""
    from transformers import CLIPTextModel

    return CLIPTextModel(clip_config(spec)).eval()


class TextEncoder(nn.Module):
    """Tensor-only wrapper: ``forward(input_ids [B,77] int) -> last_hidden_state [B,77,D]``."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.clip(input_ids=input_ids.long(), return_dict=False)[0]
