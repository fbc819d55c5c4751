"""The CLIP text encoder (transformers ``CLIPTextModel``) built from a :class:`TextEncoderSpec`."""
from __future__ import annotations

import torch
from torch import nn

from mobile_sd.errors import SpecError, TensorMismatchError
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


def spec_from_clip_config(config: dict, where: str = "text_encoder/config.json") -> TextEncoderSpec:
    """Inverse of :func:`clip_config`, for a user's ``text_encoder/config.json``.

    Missing optional keys take transformers' ``CLIPTextConfig`` defaults (except
    ``projection_dim``, unused by ``CLIPTextModel``); the sizes are required.
    """
    from mobile_sd.config import from_dict

    if not isinstance(config, dict):
        raise SpecError(f"{where}: expected a JSON object, got {type(config).__name__}")
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [k for k in required if k not in config]
    if missing:
        raise SpecError(f"{where}: missing required key(s) {', '.join(map(repr, missing))} "
                        "(a transformers CLIPTextConfig)")
    body = {k: config[k] for k in required}
    body.update(projection_dim=config.get("projection_dim", config["hidden_size"]),
                vocab_size=config.get("vocab_size", 49408),
                max_length=config.get("max_position_embeddings", 77),
                hidden_act=config.get("hidden_act", "quick_gelu"),
                layer_norm_eps=config.get("layer_norm_eps", 1e-5))
    return from_dict(TextEncoderSpec, body, where=where)


#: transformers 4.x ``CLIPTextModel`` wrapped the tower in ``text_model`` (5.x drops it).
_V4_PREFIX = "text_model."
#: Tensors some files carry that ``CLIPTextModel`` does not hold, dropped as transformers does:
#: ``position_ids`` (a persistent buffer before transformers 4.31; always ``arange``) and
#: ``text_projection`` (``CLIPTextModelWithProjection``'s head, unused for hidden states).
_IGNORED = ("embeddings.position_ids", "text_projection.weight")


def normalize_clip_state_dict(tensors: dict[str, torch.Tensor],
                              where: str = "text_encoder") -> dict[str, torch.Tensor]:
    """CLIP text-tower tensors under transformers 5's names, whichever version wrote them.

    >>> sorted(normalize_clip_state_dict({"text_model.final_layer_norm.weight": torch.ones(1),
    ...                                   "text_model.embeddings.position_ids": torch.ones(1)}))
    ['final_layer_norm.weight']
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        new = name.removeprefix(_V4_PREFIX)
        if new in _IGNORED:
            continue
        if new in out:
            raise TensorMismatchError(f"{where}: tensor {new!r} is stored twice, with and "
                                      f"without the {_V4_PREFIX!r} prefix")
        out[new] = tensor
    return out


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
