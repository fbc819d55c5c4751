"""Nearest-neighbour 2x upsampling that XNNPACK delegates, folded into the 3x3 conv after it.

XNNPACK has no ``upsample_nearest2d`` (only bilinear): diffusers' ``Upsample2D`` stays on the
portable kernels between two delegated convs, costing a partition break and NHWC<->NCHW copies.
``cat``-based and ``expand``/``repeat_interleave`` rewrites are not delegated either (5-D cat,
``expand_copy``; executorch 1.5.1). Two rewrites, in order of preference:

1. **Folded** (``Upsample2D`` with its usual 3x3, stride 1, padding 1 conv): nearest 2x then
   that conv equals one transposed conv with a 4x4 kernel, stride 2, padding 1, on the *small*
   input. Each output pixel then reads 2x2 input pixels instead of 3x3 (2.25x fewer MACs), and
   the upsampled tensor is never materialized. XNNPACK runs it as a Subconv2D deconvolution,
   and int8 PT2E quantizes it (groups = 1, per-output-channel weights). Before::

       x[N,C,H,W] -> upsample_nearest2d(x, 2) -> conv(w 3x3, pad 1) -> y

   After::

       x[N,C,H,W] -> conv_transpose2d(x, fold(w) 4x4, stride 2, pad 1) -> y

   Along one axis, output pixel ``2j`` sees ``x[j-1]*w0 + x[j]*(w1+w2)`` and ``2j+1`` sees
   ``x[j]*(w0+w1) + x[j+1]*w2``; :data:`_FOLD` holds those sums (the same in 2-D, per axis).
   Equal up to float rounding of the summed weights (~1e-6 relative).
2. **Depthwise** (any other ``Upsample2D``): the nearest step alone as a depthwise transposed
   conv with a 2x2 kernel of ones, stride 2 (``conv_transpose2d(x, ones[C,1,2,2], groups=C)``);
   bit-exact. Measured on executorch 1.5.1 x86, this depthwise deconvolution is slow (1.3 s of
   the full-size decoder's 3.4 s at 512x512), which is why the fold comes first; grouped
   transposed convs also stay fp32 under int8. (At 640-1280 channels in fp32 the folded
   deconvolution measured slower than conv + depthwise on x86: docs/executorch.md.)

Both keep ``state_dict`` keys: the extra kernels are non-persistent buffers, and the folded
kernel lives on the conv module itself, so its module path (``...upsamplers.0.conv``) still
names it for ``fp32_fallback``. The eager conv weight stays (unused by the rewritten forward;
lowering drops it). Re-run the pass after loading new weights: the fold is taken at apply time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

preserves_numerics = True
applies_to = ("unet", "decoder")

# (4 transposed-conv taps) x (3 conv taps): which conv taps sum into each transposed-conv tap.
_FOLD = ((0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 0))


def folded_kernel(weight: torch.Tensor) -> torch.Tensor:
    """3x3 conv weight ``[out, in, 3, 3]`` -> transposed-conv weight ``[in, out, 4, 4]`` (stride 2,
    padding 1) equal to nearest 2x upsampling followed by that conv (padding 1)."""
    fold = torch.tensor(_FOLD, dtype=torch.float64)
    summed = torch.einsum("ak,bl,oikl->ioab", fold, fold, weight.detach().double())
    return summed.to(weight.dtype).contiguous()


class _FoldedUpsampleConv(nn.Conv2d):
    """The conv of an ``Upsample2D``, called on the *un-upsampled* input: it upsamples too."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # The buffer as is: buffers follow .half() / .to() with the module, and a cast here
        # would only add a node in front of the weight.
        return F.conv_transpose2d(hidden_states, self._folded_weight, self.bias, stride=2,
                                  padding=1)


def _upsample_class() -> type[nn.Module]:
    from diffusers.models.upsampling import Upsample2D
    return Upsample2D


def _make_class(base: type[nn.Module]) -> type[nn.Module]:
    class XnnpackUpsample2D(base):
        """diffusers ``Upsample2D`` whose nearest 2x step XNNPACK delegates (see module doc)."""

        def forward(self, hidden_states: torch.Tensor, output_size=None, *args, **kwargs):
            h, w = hidden_states.shape[-2:]
            if output_size is not None and tuple(output_size) != (2 * h, 2 * w):
                return self._resize_then_conv(hidden_states, tuple(output_size))
            conv = _conv_of(self)
            if isinstance(conv, _FoldedUpsampleConv):
                return conv(hidden_states)
            hidden_states = F.conv_transpose2d(hidden_states, self._nearest_kernel, stride=2,
                                               groups=hidden_states.shape[1])
            return conv(hidden_states) if conv is not None else hidden_states

        def _resize_then_conv(self, hidden_states, output_size):
            # Any other output size: what diffusers does for a rewritable Upsample2D (no norm,
            # no learned transposed conv), with the conv run as a plain conv.
            hidden_states = F.interpolate(hidden_states, size=output_size, mode="nearest")
            conv = _conv_of(self)
            return nn.Conv2d.forward(conv, hidden_states) if conv is not None else hidden_states

    return XnnpackUpsample2D


_CLASSES: dict[type, type] = {}


def _conv_of(upsample: nn.Module) -> nn.Conv2d | None:
    """The conv of a diffusers ``Upsample2D`` (None when it has none)."""
    return upsample.conv if upsample.name == "conv" else upsample.Conv2d_0


def _rewritable(module: nn.Module, upsample_cls: type) -> bool:
    # Only the plain "nearest 2x then optional conv" configuration is rewritten; norms, learned
    # transposed convs and interpolate=False keep diffusers' own forward.
    return (type(module) is upsample_cls and module.interpolate
            and not module.use_conv_transpose and module.norm is None)


def _foldable(conv: nn.Module | None) -> bool:
    """Whether the fold applies: a plain 3x3, stride 1, padding 1 conv (zeros padding)."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


def _rewrite(sub: nn.Module, new_cls: type) -> None:
    conv = _conv_of(sub)
    if _foldable(conv):
        conv.register_buffer("_folded_weight", folded_kernel(conv.weight), persistent=False)
        conv.__class__ = _FoldedUpsampleConv
    else:
        like = conv.weight if conv is not None else torch.empty(0)
        sub.register_buffer("_nearest_kernel", torch.ones(
            sub.channels, 1, 2, 2, dtype=like.dtype, device=like.device), persistent=False)
    sub.__class__ = new_cls


def foldable_convs(module: nn.Module) -> list[nn.Conv2d]:
    """The convs :func:`apply` would fold into a transposed conv (before it runs)."""
    upsample_cls = _upsample_class()
    convs = [_conv_of(sub) for sub in module.modules() if _rewritable(sub, upsample_cls)]
    return [conv for conv in convs if _foldable(conv)]


def apply(module: nn.Module) -> int:
    """Rewrite every plain diffusers ``Upsample2D`` in ``module`` in place; returns the count.

    >>> from diffusers.models.upsampling import Upsample2D
    >>> apply(nn.Sequential(Upsample2D(8, use_conv=True)))
    1
    """
    upsample_cls = _upsample_class()
    new_cls = _CLASSES.setdefault(upsample_cls, _make_class(upsample_cls))
    targets = [sub for sub in module.modules() if _rewritable(sub, upsample_cls)]
    for sub in targets:
        _rewrite(sub, new_cls)
    return len(targets)
