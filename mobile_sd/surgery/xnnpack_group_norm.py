"""GroupNorm as ops XNNPACK delegates (view, mean.dim, sub, mul, add, rsqrt).

XNNPACK has no GroupNorm: ``aten.native_group_norm`` stays on the portable kernels and splits
every ResNet block into two delegate partitions (plus the copies in and out of them).

Before (one portable op)::

    x[N,C,H,W] -> native_group_norm(x, weight, bias, G, eps) -> y

After (all delegated)::

    v   = view(x, [N*G, 1, C/G*H*W, 1])        # channel dim 1: NCHW and NHWC share memory
    mu  = mean.dim(v, [2, 3], keepdim)           # XNNPACK global average pooling
    d   = v - mu
    var = mean.dim(d * d, [2, 3], keepdim)       # two-pass variance, like torch's kernel
    y   = view(d * rsqrt(var + eps), [N,C,H,W]) * weight[1,C,1,1] + bias[1,C,1,1]

XNNPACK's ``mean.dim`` only takes 4-D inputs reduced over dims (2, 3) with keepdim, hence the
view. Putting the group in the batch dim and leaving a channel dim of 1 makes the NHWC
conversion XNNPACK inserts in front of every ``mean.dim`` a no-op reshape instead of a
transpose. Numerics: max abs error ~1e-6 vs ``nn.GroupNorm`` on unit-scale inputs.
"""
from __future__ import annotations

import torch
from torch import nn

preserves_numerics = True
applies_to = ("unet", "decoder")


class XnnpackGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` with a forward made of XNNPACK-delegable ops (same parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[0], x.shape[1]
        v = x.reshape(n * self.num_groups, 1, -1, 1)
        d = v - v.mean(dim=(2, 3), keepdim=True)
        var = (d * d).mean(dim=(2, 3), keepdim=True)
        y = (d * torch.rsqrt(var + self.eps)).reshape(x.shape)
        if not self.affine:
            return y
        shape = (1, c) + (1,) * (x.dim() - 2)
        return y * self.weight.reshape(shape) + self.bias.reshape(shape)


def apply(module: nn.Module) -> int:
    """Turn every plain ``nn.GroupNorm`` in ``module`` into :class:`XnnpackGroupNorm`, in place.

    Only the class changes: parameters, state_dict keys and hooks stay as they were, so
    checkpoints still load. Subclasses of GroupNorm are left alone (their forward may differ).
    Returns the number of modules rewritten.

    >>> m = nn.Sequential(nn.Conv2d(4, 8, 1), nn.GroupNorm(2, 8))
    >>> apply(m)
    1
    """
    count = 0
    for sub in module.modules():
        if type(sub) is nn.GroupNorm:
            sub.__class__ = XnnpackGroupNorm
            count += 1
    return count
