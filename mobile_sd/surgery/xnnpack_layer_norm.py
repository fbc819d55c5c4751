"""LayerNorm as ops XNNPACK delegates (view, mean.dim, sub, mul, add, rsqrt).

XNNPACK has no LayerNorm: ``aten.native_layer_norm`` stays on the portable kernels and cuts
each transformer block into pieces (three LayerNorms per ``BasicTransformerBlock``, two per
CLIP layer).

Before (one portable op)::

    x[..., K] -> native_layer_norm(x, [K], weight, bias, eps) -> y

After (all delegated)::

    v   = view(x, [R, 1, K, 1])                  # R = number of normalized rows
    mu  = mean.dim(v, [2, 3], keepdim)
    d   = v - mu
    var = mean.dim(d * d, [2, 3], keepdim)
    y   = view(d * rsqrt(var + eps), x.shape) * weight + bias

Same trick as ``xnnpack_group_norm``: XNNPACK's ``mean.dim`` wants a 4-D input reduced over
(2, 3), and a channel dim of 1 keeps its NHWC conversion a no-op reshape.
Numerics: max abs error ~1e-6 vs ``nn.LayerNorm``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

preserves_numerics = True
applies_to = ("unet", "text_encoder")


class XnnpackLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` with a forward made of XNNPACK-delegable ops (same parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = math.prod(self.normalized_shape)
        v = x.reshape(-1, 1, width, 1)
        d = v - v.mean(dim=(2, 3), keepdim=True)
        var = (d * d).mean(dim=(2, 3), keepdim=True)
        y = (d * torch.rsqrt(var + self.eps)).reshape(x.shape)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y


def apply(module: nn.Module) -> int:
    """Turn every plain ``nn.LayerNorm`` in ``module`` into :class:`XnnpackLayerNorm`, in place.

    Parameters, state_dict keys and hooks are kept (only the class changes). Subclasses such
    as diffusers' ``FP32LayerNorm`` are left alone. Returns the number of modules rewritten.

    >>> m = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
    >>> apply(m)
    1
    """
    count = 0
    for sub in module.modules():
        if type(sub) is nn.LayerNorm:
            sub.__class__ = XnnpackLayerNorm
            count += 1
    return count
