"""``fp16_safe_attention_mask`` (text encoder): mask with a finite -1e4, not ``finfo.min``.

Why: CLIP's causal mask fills masked positions with ``torch.finfo(float32).min`` (-3.4e38), and
SDPA's decomposition uses -inf. The text encoder is exported in fp32, so that value is baked
into the graph; Core ML's fp16 programs (and any fp16 backend) cast it to -inf, and a fused
add/softmax that meets -inf - (-inf) or 0 * inf returns NaN. -1e4 is exact in fp16 (max 65504),
leaves room for any score above -5.5e4, and exp(-1e4) is exactly 0 in fp16 and fp32, so the
fp32 result does not change: max abs error 0 against the eager-attention tiny CLIP; 1.2e-6
against the SDPA one, from the kernel change (SDPA -> matmul), not from the mask.

Before / after (every CLIP self-attention; ``CLIPAttention`` first becomes ``CLIPSelfAttention``
with plain matmul attention, because the mask must be built by a module mobile-sd owns)::

    CLIPAttention (SDPA, is_causal)           CLIPSelfAttention / ConvCLIPEncoder
    or mask=AttentionBias(floor=None):     -> mask=AttentionBias(floor=-1e4):
      causal: full(S, S, -3.4e38).triu(1)       causal: full(S, S, -1e4).triu(1)
      bool mask: where(m, 0, -3.4e38)           bool mask: where(m, 0, -1e4)
      float mask: as is                         float mask: clamp(min=-1e4)
    scores + bias -> softmax                  scores + bias -> softmax

Rewrites in place. Compose with ``linear_to_conv`` / ``split_einsum`` in any order: they carry
the floor over.

Example (not run by the tests: it needs real artifacts)::

    text_encoder = Fp16SafeAttentionMaskPass().apply(text_encoder)
"""
from __future__ import annotations

import math

from torch import nn

from mobile_sd.errors import RecipeError
from mobile_sd.surgery.attention_original import (AttentionBias, MatmulAttention,
                                                  replace_clip_attention)
from mobile_sd.surgery.base import SurgeryPass, find_modules, replace_all

FP16_SAFE_MASK_VALUE = -1e4
_FP16_MAX = 65504.0


class Fp16SafeAttentionMaskPass(SurgeryPass):
    """Finite attention-mask values for fp16 backends (see the module docstring)."""

    name = "fp16_safe_attention_mask"
    applies_to = frozenset({"text_encoder"})

    def __init__(self, mask_value: float = FP16_SAFE_MASK_VALUE):
        # Below -1e3 so that exp() of a masked score is 0 even beside large scores; above
        # -65504 so that fp16 holds it.
        if not (isinstance(mask_value, (int, float)) and math.isfinite(mask_value)
                and -_FP16_MAX <= mask_value <= -1e3):
            raise RecipeError(f"{self.name}: mask_value must be a number in [-65504, -1000], "
                              f"got {mask_value!r}")
        self.mask_value = float(mask_value)

    def apply(self, module: nn.Module) -> nn.Module:
        module = replace_clip_attention(module, MatmulAttention)
        return replace_all(module, find_modules(module, AttentionBias),
                           lambda _: AttentionBias(floor=self.mask_value))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mask_value={self.mask_value})"
