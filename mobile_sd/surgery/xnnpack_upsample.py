"""Nearest-neighbour 2x upsampling that XNNPACK delegates, folded into the 3x3 conv after it.

XNNPACK has no ``upsample_nearest2d`` (only bilinear): diffusers' ``Upsample2D`` stays on the
portable kernels between two delegated convs, costing a partition break and NHWC<->NCHW copies.
``cat``-based and ``expand``/``repeat_interleave`` rewrites are not delegated either (5-D cat,
``expand_copy``; executorch 1.5.1). Two rewrites:

1. **Phase conv** (``Upsample2D`` with its usual 3x3, stride 1, padding 1 conv). After nearest
   2x, output pixel ``(2i + a, 2j + b)`` of the conv reads only 2x2 distinct input pixels, the
   same for every pixel of its *phase* ``(a, b)``: along one axis phase 0 sees
   ``x[i-1]*w0 + x[i]*(w1+w2)`` and phase 1 ``x[i]*(w0+w1) + x[i+1]*w2`` (:data:`_PHASE_TAPS`).
   So the pair is one 2x2 conv with 4x the output channels (a block per phase) on the *small*
   input, padding 1; its output is ``(H+1) x (W+1)``, and phase ``(a, b)`` is its block at
   offset ``(a, b)``. Four slices, a concat and depth-to-space (``view -> permute -> reshape``)
   interleave them. Before::

       x[N,C,H,W] -> upsample_nearest2d(x, 2) -> conv(w 3x3, pad 1) -> y

   After::

       x -> conv(w4 [4C,C,2,2], pad 1) -> 4 x slice(block, offset) -> cat -> depth-to-space -> y

   2.25x fewer MACs (4 taps per output pixel instead of 9, plus the one-pixel border), one IGEMM
   convolution, and the upsampled input is never materialized. Equal up to float rounding of
   the summed weights (~1e-6 relative). Why not four convs on slices of an ``F.pad``-ded input
   (as fast): XNNPACK rejects a constant pad whose input is int8 and output fp32
   (``xnn_status_invalid_parameter`` at load), which int8 PT2E produces when the upsampler
   follows a quantized add (the full-size UNet's did).
2. **Depthwise** (any other ``Upsample2D``): the nearest step alone as a depthwise transposed
   conv with a 2x2 kernel of ones, stride 2 (``conv_transpose2d(x, ones[C,1,2,2], groups=C)``),
   then the conv as is; bit-exact. Slow on executorch 1.5.1 x86 (1.3 s of the full-size
   decoder's 3.4 s at 512x512 when every upsampler took it), and grouped transposed convs stay
   fp32 under int8.

Why a phase conv (``benchmarks/upsample_forms.py``: each upsampler shape of the full-size
models exported alone, x86, 2 threads): two other exact forms were measured and dropped. A 4x4
stride-2 transposed conv (the same 2.25x fewer MACs) runs as XNNPACK's Subconv2D deconvolution,
far below the IGEMM rate at many channels (UNet 1280@16x16: 769 ms fp32, 173 ms int8, vs 109
and 38 for the phase conv); one 3x3 conv to 4x the channels + depth-to-space (no MAC saving,
4x the weights) is IGEMM but does 2.25x the work. The phase conv was fastest at 12 of the 14
(shape, precision) pairs; at the decoder's last upsampler (128 channels at 256x256) it ties
the transposed conv in int8 and is slower in fp32 (426 vs 365 ms): with few channels and a
large image, its slices and depth-to-space copies dominate. ARM (phone) kernels were not
measured.

Both forms keep ``state_dict`` keys: the extra kernels are non-persistent buffers, and the phase
kernel lives on the conv module itself, so its module path (``...upsamplers.0.conv``) still
names it for ``fp32_fallback``. The eager conv weight stays (unused by the rewritten forward;
lowering drops it). Re-run the pass after loading new weights: the kernels are computed at apply
time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

applies_to = ("unet", "decoder")

# Per output phase a (pixel 2i + a): (its 2 input taps) x (3 conv taps). Phase 0 reads x[i-1]
# and x[i], phase 1 reads x[i] and x[i+1]: nearest 2x repeats each input pixel twice.
_PHASE_TAPS = (((1, 0, 0), (0, 1, 1)),
               ((1, 1, 0), (0, 0, 1)))
PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))


def phase_kernel(weight: torch.Tensor) -> torch.Tensor:
    """3x3 conv weight ``[out, in, 3, 3]`` -> 2x2 conv weight ``[4 * out, in, 2, 2]``: one block
    of ``out`` channels per output phase, in :data:`PHASES` order (see
    :func:`upsample_conv_by_phases`)."""
    taps = torch.tensor(_PHASE_TAPS, dtype=torch.float64)
    w = weight.detach().double()
    blocks = [torch.einsum("uk,vl,oikl->oiuv", taps[a], taps[b], w) for a, b in PHASES]
    return torch.cat(blocks).to(weight.dtype).contiguous()


def upsample_conv_by_phases(x: torch.Tensor, kernel: torch.Tensor,
                            bias: torch.Tensor | None) -> torch.Tensor:
    """Nearest 2x upsampling of ``x`` followed by a 3x3 conv (padding 1), computed on ``x``
    from that conv's :func:`phase_kernel` and its bias repeated per phase (or None)."""
    n, _, h, w = x.shape
    y = F.conv2d(x, kernel, bias, padding=1)            # [n, 4 * out, h + 1, w + 1]
    out = y.shape[1] // 4
    # Phase (a, b) output (i, j) is its block at (i + a, j + b): the 2x2 window starting one
    # pixel up/left of (i, j) for a = 0, at (i, j) for a = 1 (same along j).
    return depth_to_space(torch.cat([y[:, k * out:(k + 1) * out, a:a + h, b:b + w]
                                     for k, (a, b) in enumerate(PHASES)], dim=1))


def depth_to_space(y: torch.Tensor) -> torch.Tensor:
    """``[n, 4 * out, h, w]`` with channel ``(2a + b) * out + o`` (one block per phase, in
    :data:`PHASES` order) -> ``[n, out, 2h, 2w]`` with that block at pixels ``(2i + a, 2j + b)``."""
    n, channels, h, w = y.shape
    out = channels // 4
    y = y.view(n, 2, 2, out, h, w).permute(0, 3, 4, 1, 5, 2)   # [n, out, h, a, w, b]
    return y.reshape(n, out, 2 * h, 2 * w)


class _PhaseUpsampleConv(nn.Conv2d):
    """The conv of an ``Upsample2D``, called on the *un-upsampled* input: it upsamples too."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # The buffers as they are: they follow .half() / .to() with the module, and a cast
        # here would only add a node in front of the weight.
        return upsample_conv_by_phases(hidden_states, self._phase_weight, self._phase_bias)


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
            if isinstance(conv, _PhaseUpsampleConv):
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


def _by_phases(conv: nn.Module | None) -> bool:
    """Whether phase convs apply: a plain 3x3, stride 1, padding 1 conv (zeros padding)."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


def _rewrite(sub: nn.Module, new_cls: type) -> None:
    conv = _conv_of(sub)
    if _by_phases(conv):
        bias = None if conv.bias is None else conv.bias.detach().repeat(4)
        conv.register_buffer("_phase_weight", phase_kernel(conv.weight), persistent=False)
        conv.register_buffer("_phase_bias", bias, persistent=False)
        conv.__class__ = _PhaseUpsampleConv
    else:
        like = conv.weight if conv is not None else torch.empty(0)
        sub.register_buffer("_nearest_kernel", torch.ones(
            sub.channels, 1, 2, 2, dtype=like.dtype, device=like.device), persistent=False)
    sub.__class__ = new_cls


def foldable_convs(module: nn.Module) -> list[nn.Conv2d]:
    """The convs :func:`apply` would fold, with the upsampling before them, into phase convs."""
    upsample_cls = _upsample_class()
    convs = [_conv_of(sub) for sub in module.modules() if _rewritable(sub, upsample_cls)]
    return [conv for conv in convs if _by_phases(conv)]


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
