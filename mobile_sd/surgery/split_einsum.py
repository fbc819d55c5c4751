"""``split_einsum`` / ``split_einsum_v2``: Apple Neural Engine attention, one head at a time.

Idea from Apple's "Deploying Transformers on the Apple Neural Engine" (2022) and
apple/ml-stable-diffusion; this is an independent implementation. On the ``(B, C, 1, S)`` layout
each head's Q, K and V are channel slices; an einsum per head gives an attention map laid out
``(B, S_k, 1, S_q)`` whose softmax runs over axis 1, so no attention map is ever reshaped or
transposed (ane.md rule E9). v2 also cuts the queries into chunks of at most ``chunk_size``
(default 512) so that no map has a query length above it, for any sequence length (4096 =
8 x 512; 576 = 512 + 64; 77 = one chunk).

Before / after, one attention with H heads of width d (v2, S_q = 576, chunk 512)::

    q, k, v (B, H*d, 1, S)                    q, k, v (B, H*d, 1, S)
    -> reshape (B, H, S, d) + transpose       -> split on channels: H x (B, d, 1, S); k^T (B, S, 1, d)
    -> softmax(Q K^T) V on (B, H, S_q, S_k)   -> per head h, per query chunk c = [0:512], [512:576]:
    -> transpose + reshape (B, H*d, 1, S)          w = einsum("bchq,bkhc->bkhq", q_h[..., c], k_h^T)
                                                   w = softmax(w + bias, dim=1)    # (B, S_k, 1, |c|)
                                                   o = einsum("bkhq,bchk->bchq", w, v_h)  # (B, d, 1, |c|)
                                              -> concat chunks on axis 3, heads on axis 1

Where it goes: diffusers ``Attention`` get ``processor=KernelAttnProcessor(SplitEinsumAttention)``
(projections stay ``nn.Linear``: apply ``linear_to_conv`` as well for the all-``conv`` ANE graph);
transformers ``CLIPAttention`` become ``CLIPSelfAttention(kernel=SplitEinsumAttention)``;
mobile-sd's own attention modules (``ConvAttention``, ``CLIPSelfAttention``) get the kernel
swapped. Rewrites in place. Preserves numerics (fp32 max abs error <= 6e-6 on the tiny models).

Example (not run by the tests: it needs real artifacts)::

    unet = SplitEinsumV2AttentionPass(chunk_size=512).apply(unet)
"""
from __future__ import annotations

import torch
from torch import nn

from mobile_sd.errors import RecipeError
from mobile_sd.surgery.attention_original import swap_attention_kernels
from mobile_sd.surgery.base import (COMPONENTS, KernelAttnProcessor, Layout, SurgeryPass,
                                    to_bc1s, to_bsc)


class SplitEinsumAttention(nn.Module):
    """Per-head einsum attention on ``(B, C, 1, S)``; ``chunk_size`` also chunks the queries."""

    def __init__(self, chunk_size: int | None = None):
        super().__init__()
        self.chunk_size = chunk_size

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                scale: float, bias: torch.Tensor | None = None,
                layout: Layout = "bc1s") -> torch.Tensor:
        if layout == "bsc":
            return to_bsc(self.forward(to_bc1s(q), to_bc1s(k), to_bc1s(v), heads, scale, bias))
        width = q.shape[1] // heads
        # Scale q, not the maps: (B, C, 1, S_q) is far smaller than H maps of S_q x S_k.
        qs = (q * scale).split(width, dim=1)
        ks = k.transpose(1, 3).split(width, dim=3)  # (B, S_k, 1, C): k_h^T for every head
        vs = v.split(width, dim=1)
        bias = None if bias is None else bias.transpose(-1, -2)  # (B|1, H|1, S_k, S_q|1)
        heads_out = [self._head(qs[h], ks[h], vs[h], _head_bias(bias, h)) for h in range(heads)]
        return torch.cat(heads_out, dim=1)

    def _head(self, q, k, v, bias):
        """One head: q ``(B, d, 1, S_q)``, k ``(B, S_k, 1, d)``, v ``(B, d, 1, S_k)``."""
        length = q.shape[3]
        if self.chunk_size is None or self.chunk_size >= length:
            return self._chunk(q, k, v, bias)  # no slicing: a full-length slice exports as alias
        step = self.chunk_size
        outs = [self._chunk(q[..., start:start + step], k, v, _chunk_bias(bias, start, step))
                for start in range(0, length, step)]
        return torch.cat(outs, dim=3)

    @staticmethod
    def _chunk(q, k, v, bias):
        weights = torch.einsum("bchq,bkhc->bkhq", q, k)  # (B, S_k, 1, chunk)
        if bias is not None:
            weights = weights + bias
        return torch.einsum("bkhq,bchk->bchq", weights.softmax(dim=1), v)

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}"


def _head_bias(bias: torch.Tensor | None, head: int) -> torch.Tensor | None:
    """``(B|1, H|1, S_k, S_q|1)`` -> this head's ``(B|1, S_k, 1, S_q|1)``."""
    if bias is None:
        return None
    return bias[:, head if bias.shape[1] > 1 else 0].unsqueeze(2)


def _chunk_bias(bias: torch.Tensor | None, start: int, step: int) -> torch.Tensor | None:
    if bias is None or bias.shape[3] == 1:  # one value for every query: nothing to slice
        return bias
    return bias[..., start:start + step]


class SplitEinsumAttentionPass(SurgeryPass):
    """v1: per-head einsum attention, no query chunking (see the module docstring)."""

    name = "split_einsum"
    applies_to = frozenset(COMPONENTS)
    chunk_size: int | None = None

    def _kernel(self) -> SplitEinsumAttention:
        return SplitEinsumAttention(self.chunk_size)

    def apply(self, module: nn.Module) -> nn.Module:
        return swap_attention_kernels(module, self.name,
                                      lambda: KernelAttnProcessor(self._kernel()), self._kernel)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(chunk_size={self.chunk_size})"


class SplitEinsumV2AttentionPass(SplitEinsumAttentionPass):
    """v2: v1 plus query chunks of at most ``chunk_size`` (default 512) tokens."""

    name = "split_einsum_v2"

    def __init__(self, chunk_size: int = 512):
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise RecipeError(f"split_einsum_v2: chunk_size must be a positive integer, "
                              f"got {chunk_size!r}")
        self.chunk_size = chunk_size
