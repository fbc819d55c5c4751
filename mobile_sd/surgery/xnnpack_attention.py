"""Softmax scale folded into the query projection; no no-op multiply or divide left in attention.

diffusers' ``AttnProcessor`` (what ``attention_original`` installs) exports as
``bmm(q, k^T) * scale`` and ends with ``out / rescale_output_factor``. Both are full elementwise
passes that XNNPACK runs as written: the score multiply touches ``B*heads x S x S`` values
(16 x 1024 x 1024 at the 32x32 level, ~2.3 ms per self-attention in int8 on this host), and
in int8 the divide by 1.0 costs two requantizing converts as well.

Before / After (every diffusers ``Attention`` and mobile-sd ``KernelAttention``)::

    q = to_q(x);                 softmax(bmm(q, k^T) * s) v ... / 1.0
    q = to_q'(x)  (to_q' = s * to_q: weight and bias scaled once, here);  softmax(bmm(q, k^T)) v

diffusers attentions get :class:`~mobile_sd.surgery.base.KernelAttnProcessor` with
``MatmulAttention`` (same features as ``AttnProcessor``; it skips the divide when the factor is
1 and ``MatmulAttention`` skips the multiply when the scale is 1). Attentions whose processor
does not read ``attn.scale`` (``AttnProcessor2_0``'s SDPA uses its own default) and
transformers' ``CLIPAttention`` are left as they are: run ``attention_original`` first.
Numerics: one fp32 rounding of ``s * w`` per weight, max abs error ~1e-6 on the tiny models.
"""
from __future__ import annotations

import torch
from torch import nn

applies_to = ("unet", "text_encoder", "decoder")


def _fold(projection: nn.Module, scale: float) -> None:
    with torch.no_grad():
        projection.weight.mul_(scale)
        if getattr(projection, "bias", None) is not None:
            projection.bias.mul_(scale)


def _use_matmul_kernel(module: nn.Module) -> None:
    """diffusers' ``AttnProcessor`` -> ``KernelAttnProcessor(MatmulAttention())`` (same math)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    from mobile_sd.surgery.attention_original import MatmulAttention
    from mobile_sd.surgery.base import KernelAttnProcessor

    for sub in module.modules():
        if isinstance(sub, Attention) and type(sub.processor) is AttnProcessor:
            sub.set_processor(KernelAttnProcessor(MatmulAttention()))


def _scaled_attentions(module: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(attention, its query projection) for every attention whose kernel reads ``.scale``."""
    from diffusers.models.attention_processor import Attention

    from mobile_sd.surgery.base import KernelAttention, KernelAttnProcessor

    found = []
    for sub in module.modules():
        if isinstance(sub, Attention) and isinstance(sub.processor, KernelAttnProcessor):
            found.append((sub, sub.to_q))
        elif isinstance(sub, KernelAttention):  # CLIPSelfAttention (q_proj), ConvAttention (to_q)
            found.append((sub, sub.to_q if hasattr(sub, "to_q") else sub.q_proj))
    return found


def apply(module: nn.Module) -> int:
    """Fold every attention's softmax scale into its query projection, in place.

    Parameters are scaled (a checkpoint saved afterwards holds the folded ``to_q``); names and
    shapes stay. Returns the number of attentions rewritten; a second call finds scale 1 and
    changes nothing.
    """
    _use_matmul_kernel(module)
    count = 0
    for attn, to_q in _scaled_attentions(module):
        if attn.scale != 1.0:
            _fold(to_q, attn.scale)
            attn.scale = 1.0
            count += 1
    return count
