"""Wide fp32 convs as a sum of convs over input-channel chunks of at most 640 channels.

XNNPACK's fp32 IGEMM convolution walks the whole reduction (in_channels x kernel taps) for each
output tile. With the UNet's concatenated skip inputs (up to 2,560 channels x 9 taps) the
weight panel outgrows the cache and the conv runs at a fraction of its usual rate. Measured
alone (executorch 1.5.1, fp32, 2 threads, this x86 host), one conv -> chunks of 640:
2560->1280 @16x16 446 -> 115 ms, 1920->640 @32x32 269 -> 160 ms, 1280->640 @32x32
188 -> 105 ms; neutral at 960->640 @32x32 (78 / 79 ms) and 1280->1280 @16x16 (61 / 60 ms).
Only for precisions that keep convs in floating point (static int8 convs keep their rate, and
each extra add would be requantized).

Before::

    y = conv2d(x, W, b)                                   # W: [out, in, kh, kw], in > 640

After (exact in exact arithmetic; fp32 sums in a different order)::

    y = conv2d(x[:, 0:640], W[:, 0:640], b) + conv2d(x[:, 640:1280], W[:, 640:1280]) + ...

The chunk kernels are non-persistent buffers: the conv's ``weight`` parameter, its state_dict
key and checkpoints stay as they were (the exporter drops the then-unread parameter).
Run after ``xnnpack_upsample``, whose convs it leaves alone (only plain ``nn.Conv2d``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

applies_to = ("unet", "decoder")
precisions = ("fp32", "fp16", "int8_dynamic", "int4_weight")  # the ones that keep convs float
MAX_IN_CHANNELS = 640


class ChannelChunkConv2d(nn.Conv2d):
    """``nn.Conv2d`` computed as a sum over input-channel chunks (same parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, start = None, 0
        for i, kernel in enumerate(self._chunk_kernels()):
            part = F.conv2d(x[:, start:start + kernel.shape[1]], kernel,
                            self.bias if i == 0 else None, self.stride, self.padding,
                            self.dilation)
            out = part if out is None else out + part
            start += kernel.shape[1]
        return out

    def _chunk_kernels(self) -> list[torch.Tensor]:
        chunks = math.ceil(self.in_channels / MAX_IN_CHANNELS)
        return [getattr(self, f"_chunk_weight_{i}") for i in range(chunks)]


def _splittable(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.groups == 1 and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple) and conv.in_channels > MAX_IN_CHANNELS)


def apply(module: nn.Module) -> int:
    """Turn every plain ``nn.Conv2d`` with more than 640 input channels into
    :class:`ChannelChunkConv2d`, in place; returns the count (a second call finds none)."""
    targets = [sub for sub in module.modules() if _splittable(sub)]
    for conv in targets:
        chunks = conv.weight.detach().split(MAX_IN_CHANNELS, dim=1)
        for i, kernel in enumerate(chunks):
            conv.register_buffer(f"_chunk_weight_{i}", kernel.clone(), persistent=False)
        conv.__class__ = ChannelChunkConv2d
    return len(targets)
