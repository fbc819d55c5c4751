"""``attention_original``: plain matmul-softmax attention, no ``scaled_dot_product_attention``.

Why: torch 2.13 decomposes SDPA into "safe softmax" ops (any / eq / where / logical_not) that
ExecuTorch's XNNPACK partitioner does not delegate, so every attention splits the graph into
more partitions. Measured with executorch 1.5.1: the tiny test UNet goes from 55 to 39 XNNPACK
partitions (141 -> 45 ops left on portable kernels), the 2-layer CLIP from 9 to 5.

Before / after, UNet and decoder (every diffusers ``Attention``)::

    Attention(to_q, to_k, to_v, to_out, processor=AttnProcessor2_0)   # F.scaled_dot_product_attention
 -> Attention(to_q, to_k, to_v, to_out, processor=AttnProcessor)      # baddbmm -> softmax -> bmm

Before / after, text encoder (every transformers ``CLIPAttention``)::

    CLIPAttention(q_proj, k_proj, v_proj, out_proj)     # kernel picked by config._attn_implementation
 -> CLIPSelfAttention(q_proj, k_proj, v_proj, out_proj, # the same Linear modules
        mask=AttentionBias(floor=None),                # CLIP's masks -> one additive bias
        kernel=MatmulAttention())                      # bmm -> * scale -> + bias -> softmax -> bmm

Modules that other passes already own (:class:`~mobile_sd.surgery.base.KernelAttention`, e.g.
``ConvAttention`` from ``linear_to_conv``) get their ``kernel`` child replaced by
:class:`MatmulAttention`, which undoes ``split_einsum``. Rewrites in place.

Example (not run by the tests: it needs real artifacts)::

    unet = AttentionOriginalPass().apply(unet)
"""
from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import nn
from transformers.models.clip.modeling_clip import CLIPAttention

from mobile_sd.surgery.base import (COMPONENTS, KernelAttention, KernelAttnProcessor, Layout,
                                    SurgeryPass, check_plain_attention, find_modules, replace_all)


class MatmulAttention(nn.Module):
    """``softmax(q k^T * scale + bias) v`` as two 3-D ``bmm`` with heads folded into the batch.

    3-D ``bmm``, not 4-D ``matmul`` (which exports with ``expand`` ops XNNPACK leaves out), and
    softmax over the last axis, the only one XNNPACK's softmax delegates.
    """

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                scale: float, bias: torch.Tensor | None = None,
                layout: Layout = "bsc") -> torch.Tensor:
        batch = q.shape[0]
        q, k, v = (_split_heads(t, heads, layout) for t in (q, k, v))
        scores = torch.bmm(q, k.transpose(1, 2))
        if scale != 1.0:  # 1.0 once xnnpack_attention folded the scale into the query
            scores = scores * scale
        if bias is not None:
            shape = scores.shape
            scores = (scores.reshape(batch, heads, *shape[1:]) + bias).reshape(shape)
        return _merge_heads(torch.bmm(scores.softmax(dim=-1), v), batch, layout)


def _split_heads(x: torch.Tensor, heads: int, layout: Layout) -> torch.Tensor:
    """``bsc (B, S, C)`` or ``bc1s (B, C, 1, S)`` -> ``(B * heads, S, C // heads)``."""
    if layout == "bsc":
        b, s, c = x.shape
        return x.reshape(b, s, heads, c // heads).transpose(1, 2).reshape(b * heads, s, -1)
    b, c, _, s = x.shape
    return x.reshape(b * heads, c // heads, s).transpose(1, 2)


def _merge_heads(x: torch.Tensor, batch: int, layout: Layout) -> torch.Tensor:
    """Inverse of :func:`_split_heads`."""
    bh, s, d = x.shape
    if layout == "bsc":
        return x.reshape(batch, bh // batch, s, d).transpose(1, 2).reshape(batch, s, -1)
    return x.transpose(1, 2).reshape(batch, -1, 1, s)


class AttentionBias(nn.Module):
    """What CLIP's encoder hands its attention layers -> one additive bias ``(B|1, 1, S, S)``.

    transformers passes ``None`` plus ``is_causal=True`` (SDPA, eager run), a boolean mask (SDPA
    under torch.export) or a float mask holding ``finfo(dtype).min`` (eager attention). ``floor``
    None keeps that value; a finite floor (``fp16_safe_attention_mask``) replaces it.
    """

    def __init__(self, floor: float | None = None):
        super().__init__()
        self.floor = floor

    def forward(self, attention_mask: torch.Tensor | None, is_causal: bool, seq_len: int,
                like: torch.Tensor) -> torch.Tensor | None:
        neg = torch.finfo(like.dtype).min if self.floor is None else self.floor
        if attention_mask is None:
            if not is_causal:
                return None
            # Built from the static length only, so exporters fold it into a constant.
            causal = torch.full((seq_len, seq_len), neg, dtype=like.dtype, device=like.device)
            return causal.triu(1)[None, None]
        if attention_mask.dtype == torch.bool:  # True = attend
            # Tensor operands: coremltools has no converter for where(mask, scalar, scalar).
            zero = torch.zeros((), dtype=like.dtype, device=like.device)
            return torch.where(attention_mask, zero, torch.full_like(zero, neg))
        if self.floor is None:
            return attention_mask
        return attention_mask.clamp(min=self.floor)

    def extra_repr(self) -> str:
        return f"floor={self.floor}"


class CLIPSelfAttention(KernelAttention):
    """Drop-in for transformers' ``CLIPAttention`` (same call and return), ``bsc`` layout."""

    def __init__(self, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear,
                 out_proj: nn.Linear, heads: int, scale: float, kernel: nn.Module,
                 mask: AttentionBias | None = None):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.heads, self.scale = heads, scale
        self.mask = mask if mask is not None else AttentionBias()
        self.kernel = kernel

    @classmethod
    def from_clip(cls, attn: CLIPAttention, kernel: nn.Module) -> "CLIPSelfAttention":
        return cls(attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, attn.num_heads,
                   attn.scale, kernel)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs) -> tuple[torch.Tensor, None]:
        bias = self.mask(attention_mask, kwargs.get("is_causal", False), hidden_states.shape[1],
                         hidden_states)
        q = self.q_proj(hidden_states)
        k, v = self.k_proj(hidden_states), self.v_proj(hidden_states)
        out = self.kernel(q, k, v, self.heads, self.scale, bias, "bsc")
        return self.out_proj(out), None  # CLIPAttention returns (output, attention weights)


def replace_clip_attention(root: nn.Module, kernel_factory) -> nn.Module:
    """Replace every transformers ``CLIPAttention`` under ``root`` by a ``CLIPSelfAttention``."""
    return replace_all(root, find_modules(root, CLIPAttention),
                       lambda attn: CLIPSelfAttention.from_clip(attn, kernel_factory()))


class AttentionOriginalPass(SurgeryPass):
    """Plain matmul-softmax attention everywhere (see the module docstring)."""

    name = "attention_original"
    applies_to = frozenset(COMPONENTS)

    def apply(self, module: nn.Module) -> nn.Module:
        return swap_attention_kernels(module, self.name, AttnProcessor, MatmulAttention)


def swap_attention_kernels(module: nn.Module, pass_name: str, make_processor,
                           make_kernel) -> nn.Module:
    """Give every attention in ``module`` the kernel ``make_kernel()``: diffusers ``Attention``
    get ``make_processor()``, modules owned by other passes get a new ``kernel`` child, CLIP
    attention is replaced. All diffusers attentions are checked before any is changed."""
    attentions = find_modules(module, Attention)
    for name, attn in attentions:
        check_plain_attention(attn, name, pass_name,
                              (AttnProcessor, AttnProcessor2_0, KernelAttnProcessor))
    for _, attn in attentions:
        attn.set_processor(make_processor())
    for _, attn in find_modules(module, KernelAttention):
        attn.kernel = make_kernel()
    return replace_clip_attention(module, make_kernel)
