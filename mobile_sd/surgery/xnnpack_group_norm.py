"""GroupNorm as ops XNNPACK delegates in its NHWC layout (mean.dim, sub, mul, add, rsqrt, linear).

XNNPACK has no GroupNorm: ``aten.native_group_norm`` stays on the portable kernels and splits
every ResNet block into two delegate partitions (plus the copies in and out of them).

Before (one portable op)::

    x[N,C,H,W] -> native_group_norm(x, weight, bias, G, eps) -> y

After (all delegated; statistics per channel, then per group on tiny tensors)::

    group_mean(t) = linear(mean.dim(view(mean.dim(t, [2, 3]), [N, G, C/G, 1]), [2, 3]), E)
    d     = x - group_mean(x)                    # [N,C,1,1] broadcast
    var   = group_mean(d * d)                    # two-pass variance, like torch's kernel
    y     = d * (rsqrt(var + eps) * weight) + bias

``E`` is the ``[C, G]`` 0/1 matrix that copies each group's value back to its channels (XNNPACK
delegates neither ``expand`` nor ``repeat_interleave``). XNNPACK's ``mean.dim`` only takes 4-D
inputs reduced over dims (2, 3) with keepdim. The full-size tensor is never reshaped: convs hand
XNNPACK NHWC tensors, and a reshape that splits channels would need a transpose to NCHW and back
around every norm. Measured (executorch 1.5.1, x86, conv-GroupNorm-SiLU-conv at 320x64x64): the
earlier ``view(x, [N*G, 1, -1, 1])`` form cost 12% more in int8 and 9% in fp32, all transposes.
Inputs of other ranks (attention's ``[B, C, S]``) are viewed as ``[B, C, S, 1]``.
Numerics: max abs error ~1e-6 vs ``nn.GroupNorm`` on unit-scale inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

applies_to = ("unet", "decoder")


class XnnpackGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` with a forward made of XNNPACK-delegable ops (same parameters)."""

    def _group_mean(self, t: torch.Tensor) -> torch.Tensor:
        n, c, groups = t.shape[0], t.shape[1], self.num_groups
        per_channel = t.mean(dim=(2, 3), keepdim=True)
        per_group = per_channel.reshape(n, groups, c // groups, 1).mean(dim=(2, 3), keepdim=True)
        return F.linear(per_group.reshape(n, groups), self._group_to_channel).reshape(n, c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x if x.dim() == 4 else x.reshape(x.shape[0], x.shape[1], -1, 1)
        d = v - self._group_mean(v)
        scale = torch.rsqrt(self._group_mean(d * d) + self.eps)
        if self.affine:
            shape = (1, v.shape[1], 1, 1)
            y = d * (scale * self.weight.reshape(shape)) + self.bias.reshape(shape)
        else:
            y = d * scale
        # No reshape on 4-D inputs: even a same-shape view_copy makes XNNPACK convert the
        # whole tensor NHWC -> NCHW here and back before the next conv.
        return y if x.dim() == 4 else y.reshape(x.shape)


def _group_to_channel(norm: nn.GroupNorm) -> torch.Tensor:
    like = norm.weight if norm.affine else torch.empty(0)
    eye = torch.eye(norm.num_groups, dtype=like.dtype, device=like.device)
    return eye.repeat_interleave(norm.num_channels // norm.num_groups, dim=0)


def apply(module: nn.Module) -> int:
    """Turn every plain ``nn.GroupNorm`` in ``module`` into :class:`XnnpackGroupNorm`, in place.

    The class changes and a small non-persistent buffer is added: parameters, state_dict keys
    and hooks stay as they were, so checkpoints still load. Subclasses of GroupNorm are left alone (their forward may differ).
    Returns the number of modules rewritten.

    >>> m = nn.Sequential(nn.Conv2d(4, 8, 1), nn.GroupNorm(2, 8))
    >>> apply(m)
    1
    """
    count = 0
    for sub in module.modules():
        if type(sub) is nn.GroupNorm:
            # Non-persistent: state_dict keys stay those of nn.GroupNorm.
            sub.register_buffer("_group_to_channel", _group_to_channel(sub), persistent=False)
            sub.__class__ = XnnpackGroupNorm
            count += 1
    return count
