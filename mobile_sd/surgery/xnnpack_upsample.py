"""Nearest-neighbour 2x upsampling as a depthwise transposed conv, which XNNPACK delegates.

XNNPACK has no ``upsample_nearest2d`` (only bilinear): diffusers' ``Upsample2D`` stays on the
portable kernels between two delegated convs, costing a partition break and NHWC<->NCHW copies.
Measured alternatives on executorch 1.5.1: ``cat``-based and ``expand``/``repeat_interleave``
rewrites are not delegated either (5-D cat, ``expand_copy``); a depthwise ``conv_transpose2d``
with a 2x2 kernel of ones and stride 2 is, and it stays in NHWC next to the following conv.

Before::

    x[N,C,H,W] -> upsample_nearest2d(x, scale 2) -> conv(3x3) -> y

After::

    x[N,C,H,W] -> conv_transpose2d(x, ones[C,1,2,2], stride=2, groups=C) -> conv(3x3) -> y

Each output pixel is one input pixel times 1.0, so the result is bit-exact. The kernel is a
non-persistent buffer: state_dict keys are unchanged. Under int8 PT2E the transposed conv must
stay fp32 (XNNPACK does not take per-channel transposed convs with groups > 1):
:data:`QUANT_EXEMPT_ATTR` marks the module for ``mobile_sd.compress.pt2e``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

preserves_numerics = True
applies_to = ("unet", "decoder")

#: Attribute set on rewritten modules; quantizers leave their transposed conv in fp32.
QUANT_EXEMPT_ATTR = "_mobile_sd_quant_exempt_ops"


def _upsample_class() -> type[nn.Module]:
    from diffusers.models.upsampling import Upsample2D
    return Upsample2D


def _make_class(base: type[nn.Module]) -> type[nn.Module]:
    class XnnpackUpsample2D(base):
        """diffusers ``Upsample2D`` whose nearest 2x step is a depthwise transposed conv."""

        def forward(self, hidden_states: torch.Tensor, output_size=None, *args, **kwargs):
            h, w = hidden_states.shape[-2:]
            if output_size is not None and tuple(output_size) != (2 * h, 2 * w):
                return super().forward(hidden_states, output_size, *args, **kwargs)
            kernel = self._nearest_kernel.to(hidden_states.dtype)
            hidden_states = F.conv_transpose2d(hidden_states, kernel, stride=2,
                                               groups=hidden_states.shape[1])
            if self.use_conv:
                conv = self.conv if self.name == "conv" else self.Conv2d_0
                hidden_states = conv(hidden_states)
            return hidden_states

    return XnnpackUpsample2D


_CLASSES: dict[type, type] = {}


def _rewritable(module: nn.Module, upsample_cls: type) -> bool:
    # Only the plain "nearest 2x then optional conv" configuration is rewritten; norms, learned
    # transposed convs and interpolate=False keep diffusers' own forward.
    return (type(module) is upsample_cls and module.interpolate
            and not module.use_conv_transpose and module.norm is None)


def apply(module: nn.Module) -> int:
    """Rewrite every plain diffusers ``Upsample2D`` in ``module`` in place; returns the count.

    >>> from diffusers.models.upsampling import Upsample2D
    >>> apply(nn.Sequential(Upsample2D(8, use_conv=True)))
    1
    """
    upsample_cls = _upsample_class()
    new_cls = _CLASSES.setdefault(upsample_cls, _make_class(upsample_cls))
    count = 0
    for sub in module.modules():
        if not _rewritable(sub, upsample_cls):
            continue
        conv = sub.conv if sub.name == "conv" else sub.Conv2d_0
        like = conv.weight if conv is not None else torch.empty(0)
        sub.register_buffer("_nearest_kernel", torch.ones(
            sub.channels, 1, 2, 2, dtype=like.dtype, device=like.device), persistent=False)
        setattr(sub, QUANT_EXEMPT_ATTR, ("conv_transpose2d",))
        sub.__class__ = new_cls
        count += 1
    return count
