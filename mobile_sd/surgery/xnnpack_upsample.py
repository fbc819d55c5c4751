"""Nearest-neighbour 2x upsampling that XNNPACK delegates, folded into the 3x3 conv after it.

XNNPACK has no ``upsample_nearest2d`` (only bilinear): diffusers' ``Upsample2D`` stays on the
portable kernels between two delegated convs, costing a partition break and NHWC<->NCHW copies.
``cat``-based and ``expand``/``repeat_interleave`` rewrites are not delegated either (5-D cat,
``expand_copy``; executorch 1.5.1). Three rewrites; the first two need ``Upsample2D``'s usual
3x3, stride 1, padding 1 conv and are picked per layer by its input channels:

1. **Sub-pixel** (``in_channels >= SUBPIXEL_MIN_CHANNELS``): nearest 2x then a 3x3 conv equals,
   on the *small* input, one 3x3 conv with 4x the output channels (one per output phase
   ``(a, b)``, each using 2x2 of its 9 taps, the others zero) followed by depth-to-space as
   ``view -> permute -> reshape``. Same MACs as upsample + conv, but as one IGEMM convolution,
   the fastest XNNPACK op, and the upsampled input is never materialized. :data:`_PHASES`
   holds, per phase along one axis, which conv taps sum into each small-input tap.
2. **Folded** (fewer channels): nearest 2x then that conv equals one transposed conv with a
   4x4 kernel, stride 2, padding 1, on the *small* input. Each output pixel then reads 2x2 input pixels instead of 3x3 (2.25x fewer MACs), and
   the upsampled tensor is never materialized. XNNPACK runs it as a Subconv2D deconvolution,
   and int8 PT2E quantizes it (groups = 1, per-output-channel weights). Before::

       x[N,C,H,W] -> upsample_nearest2d(x, 2) -> conv(w 3x3, pad 1) -> y

   After::

       x[N,C,H,W] -> conv_transpose2d(x, fold(w) 4x4, stride 2, pad 1) -> y

   Along one axis, output pixel ``2j`` sees ``x[j-1]*w0 + x[j]*(w1+w2)`` and ``2j+1`` sees
   ``x[j]*(w0+w1) + x[j+1]*w2``; :data:`_FOLD` holds those sums (the same in 2-D, per axis).
   Equal up to float rounding of the summed weights (~1e-6 relative), like the sub-pixel form.
3. **Depthwise** (any other ``Upsample2D``): the nearest step alone as a depthwise transposed
   conv with a 2x2 kernel of ones, stride 2 (``conv_transpose2d(x, ones[C,1,2,2], groups=C)``);
   bit-exact. Measured on executorch 1.5.1 x86, this depthwise deconvolution is slow (1.3 s of
   the full-size decoder's 3.4 s at 512x512), which is why it comes last; grouped
   transposed convs also stay fp32 under int8.

Why a channel threshold (``benchmarks/upsample_forms.py``: each upsampler of the full-size
models exported alone, executorch 1.5.1, x86, 2 threads): XNNPACK's Subconv2D deconvolution runs
the fold's 2.25x fewer MACs far below its IGEMM rate, worst at many channels, while the
sub-pixel form's depth-to-space transposes grow with the output, so they weigh most at few
channels. Sub-pixel is faster in fp32 at every measured shape (1.1x at 128 channels to 4.8x at
512); in int8 it is faster from 640 channels up (2.1-2.4x at 1280) and 18-26% slower at 128-512.
The threshold follows int8 (the shipping Android precision) except at 512 channels, where
sub-pixel costs int8 ~14 ms but saves fp32 ~0.9 s. ARM (phone) kernels were not measured.

All forms keep ``state_dict`` keys: the extra kernels are non-persistent buffers, and the folded
and sub-pixel kernels live on the conv module itself, so its module path
(``...upsamplers.0.conv``) still names them for ``fp32_fallback``. The eager conv weight stays
(unused by the rewritten forward; lowering drops it). Re-run the pass after loading new
weights: the kernels are computed at apply time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

preserves_numerics = True
applies_to = ("unet", "decoder")

# (4 transposed-conv taps) x (3 conv taps): which conv taps sum into each transposed-conv tap.
_FOLD = ((0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 0))
# Per output phase a (pixel 2i + a): (3 small-input taps i-1, i, i+1) x (3 conv taps).
_PHASES = (((1, 0, 0), (0, 1, 1), (0, 0, 0)),
           ((0, 0, 0), (1, 1, 0), (0, 0, 1)))
# From this many conv input channels up, the sub-pixel form (module doc).
SUBPIXEL_MIN_CHANNELS = 512


def folded_kernel(weight: torch.Tensor) -> torch.Tensor:
    """3x3 conv weight ``[out, in, 3, 3]`` -> transposed-conv weight ``[in, out, 4, 4]`` (stride 2,
    padding 1) equal to nearest 2x upsampling followed by that conv (padding 1)."""
    fold = torch.tensor(_FOLD, dtype=torch.float64)
    summed = torch.einsum("ak,bl,oikl->ioab", fold, fold, weight.detach().double())
    return summed.to(weight.dtype).contiguous()


def subpixel_kernel(weight: torch.Tensor) -> torch.Tensor:
    """3x3 conv weight ``[out, in, 3, 3]`` -> 3x3 conv weight ``[out * 4, in, 3, 3]`` (padding 1)
    whose output channel ``4 * o + 2 * a + b`` is output pixel ``(2i + a, 2j + b)`` of nearest
    2x upsampling followed by that conv (padding 1)."""
    phases = torch.tensor(_PHASES, dtype=torch.float64)
    summed = torch.einsum("auk,bvl,oikl->oabiuv", phases, phases, weight.detach().double())
    return summed.reshape(-1, *weight.shape[1:]).to(weight.dtype).contiguous()


def depth_to_space(x: torch.Tensor) -> torch.Tensor:
    """``[N, 4C, H, W]`` (channel ``4c + 2a + b``) -> ``[N, C, 2H, 2W]`` (pixel ``(2i+a, 2j+b)``)."""
    n, c4, h, w = x.shape
    x = x.view(n, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(n, c4 // 4, 2 * h, 2 * w)


class _SubpixelUpsampleConv(nn.Conv2d):
    """The conv of an ``Upsample2D``, called on the *un-upsampled* input, as a sub-pixel conv."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return depth_to_space(F.conv2d(hidden_states, self._subpixel_weight, self._subpixel_bias,
                                       padding=1))


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
            if isinstance(conv, (_FoldedUpsampleConv, _SubpixelUpsampleConv)):
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


def _form(conv: nn.Module | None, subpixel_min_channels: int) -> str:
    """``"subpixel"``, ``"folded"`` or ``"depthwise"`` (module doc): the first two need a plain
    3x3, stride 1, padding 1 conv (zeros padding)."""
    plain_3x3 = (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3)
                 and conv.stride == (1, 1) and conv.padding == (1, 1) and conv.dilation == (1, 1)
                 and conv.groups == 1 and conv.padding_mode == "zeros")
    if not plain_3x3:
        return "depthwise"
    return "subpixel" if conv.in_channels >= subpixel_min_channels else "folded"


def _rewrite(sub: nn.Module, new_cls: type, subpixel_min_channels: int) -> None:
    conv = _conv_of(sub)
    form = _form(conv, subpixel_min_channels)
    if form == "subpixel":
        bias = conv.bias if conv.bias is not None else torch.zeros_like(conv.weight[:, 0, 0, 0])
        conv.register_buffer("_subpixel_weight", subpixel_kernel(conv.weight), persistent=False)
        conv.register_buffer("_subpixel_bias", bias.detach().repeat_interleave(4),
                             persistent=False)
        conv.__class__ = _SubpixelUpsampleConv
    elif form == "folded":
        conv.register_buffer("_folded_weight", folded_kernel(conv.weight), persistent=False)
        conv.__class__ = _FoldedUpsampleConv
    else:
        like = conv.weight if conv is not None else torch.empty(0)
        sub.register_buffer("_nearest_kernel", torch.ones(
            sub.channels, 1, 2, 2, dtype=like.dtype, device=like.device), persistent=False)
    sub.__class__ = new_cls


def foldable_convs(module: nn.Module,
                   subpixel_min_channels: int = SUBPIXEL_MIN_CHANNELS) -> list[nn.Conv2d]:
    """The convs :func:`apply` would fold into a transposed conv (before it runs)."""
    upsample_cls = _upsample_class()
    convs = [_conv_of(sub) for sub in module.modules() if _rewritable(sub, upsample_cls)]
    return [conv for conv in convs if _form(conv, subpixel_min_channels) == "folded"]


def apply(module: nn.Module, subpixel_min_channels: int = SUBPIXEL_MIN_CHANNELS) -> int:
    """Rewrite every plain diffusers ``Upsample2D`` in ``module`` in place; returns the count.

    ``subpixel_min_channels``: from this many conv input channels up, the sub-pixel form,
    below it the fold (module doc).

    >>> from diffusers.models.upsampling import Upsample2D
    >>> apply(nn.Sequential(Upsample2D(8, use_conv=True)))
    1
    """
    upsample_cls = _upsample_class()
    new_cls = _CLASSES.setdefault(upsample_cls, _make_class(upsample_cls))
    targets = [sub for sub in module.modules() if _rewritable(sub, upsample_cls)]
    for sub in targets:
        _rewrite(sub, new_cls, subpixel_min_channels)
    return len(targets)
