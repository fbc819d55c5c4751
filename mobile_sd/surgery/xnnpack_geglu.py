"""GEGLU's ``chunk(2)`` as two slices, which XNNPACK delegates.

``GEGLU.forward`` splits the projection with ``chunk(2, dim=-1)``, which exports as
``split_with_sizes_copy`` + ``getitem``: not an XNNPACK op, so every feed-forward block is cut
in two partitions with the split on the portable kernels.

Before::

    p = linear(x); a, g = split_with_sizes_copy(p, [D, D], -1); y = a * gelu(g)

After::

    p = linear(x); a = slice_copy(p, -1, 0, D); g = slice_copy(p, -1, D, 2D); y = a * gelu(g)

Slicing copies the same values: bit-exact.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

applies_to = ("unet",)


def _geglu_class() -> type[nn.Module]:
    from diffusers.models.activations import GEGLU
    return GEGLU


def _make_class(base: type[nn.Module]) -> type[nn.Module]:
    class XnnpackGEGLU(base):
        """diffusers ``GEGLU`` that slices the projection instead of chunking it."""

        def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            hidden_states = self.proj(hidden_states)
            half = hidden_states.shape[-1] // 2
            gate = hidden_states[..., half:]
            return hidden_states[..., :half] * F.gelu(gate)

    return XnnpackGEGLU


_CLASSES: dict[type, type] = {}


def apply(module: nn.Module) -> int:
    """Rewrite every diffusers ``GEGLU`` in ``module`` in place; returns the count.

    >>> from diffusers.models.activations import GEGLU
    >>> apply(nn.Sequential(GEGLU(8, 16)))
    1
    """
    geglu_cls = _geglu_class()
    new_cls = _CLASSES.setdefault(geglu_cls, _make_class(geglu_cls))
    count = 0
    for sub in module.modules():
        if type(sub) is geglu_cls:
            sub.__class__ = new_cls
            count += 1
    return count
