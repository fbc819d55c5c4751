"""Linear algebra, convolution, normalization, pooling, resampling and attention kernels."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mobile_sd.runtimes.coreml.kernels_math import bval, fval, ilist, ival

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _same_pads(sizes, kernel, strides, dilations, lower=False):
    pads = []
    for n, k, s, d in zip(sizes, kernel, strides, dilations):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        small = total // 2
        pads.append((total - small, small) if lower else (small, total - small))
    return pads


def _pads(a, spatial, kernel, strides, dilations):
    """Per spatial dim (begin, end) padding from MIL's pad_type / pad."""
    pad_type = a.get("pad_type") or "valid"
    n = len(spatial)
    if pad_type == "valid":
        return [(0, 0)] * n
    if pad_type == "custom":
        pad = ilist(a.get("pad")) or [0] * (2 * n)
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(n)]
    if pad_type in ("same", "same_lower"):
        return _same_pads(spatial, kernel, strides, dilations, lower=pad_type == "same_lower")
    raise ValueError(f"pad_type {pad_type!r}")


def _apply_pads(x, pads, value=0.0):
    if all(b == 0 and e == 0 for b, e in pads):
        return x
    return F.pad(x, [p for pair in reversed(pads) for p in pair], value=value)


def k_conv(op, a):
    x, w = a["x"], a["weight"]
    n = x.dim() - 2
    strides = ilist(a.get("strides")) or [1] * n
    dilations = ilist(a.get("dilations")) or [1] * n
    pads = _pads(a, list(x.shape[2:]), list(w.shape[2:]), strides, dilations)
    sym = all(b == e for b, e in pads)
    padding = [b for b, _ in pads] if sym else 0
    if not sym:
        x = _apply_pads(x, pads)
    return _CONV[n](x, w, a.get("bias"), stride=strides, padding=padding, dilation=dilations,
                    groups=ival(a.get("groups"), 1))


def k_conv_transpose(op, a):
    x, w = a["x"], a["weight"]          # MIL weight: [C_in, C_out / groups, *K] like torch
    n = x.dim() - 2
    strides = ilist(a.get("strides")) or [1] * n
    dilations = ilist(a.get("dilations")) or [1] * n
    groups = ival(a.get("groups"), 1)
    out = _CONV_T[n](x, w, a.get("bias"), stride=strides, dilation=dilations, groups=groups)
    pad_type = a.get("pad_type") or "valid"
    if pad_type == "custom":
        pad = ilist(a.get("pad")) or [0] * (2 * n)
        for i in range(n):
            out = out.narrow(2 + i, pad[2 * i], out.shape[2 + i] - pad[2 * i] - pad[2 * i + 1])
    out_shape = ilist(a.get("output_shape"))
    if out_shape is not None and list(out.shape) != out_shape:
        for i in range(n):
            out = out.narrow(2 + i, 0, out_shape[2 + i])
    return out


def k_linear(op, a):
    return F.linear(a["x"], a["weight"], a.get("bias"))


def k_matmul(op, a):
    x, y = a["x"], a["y"]
    if bval(a.get("transpose_x"), False) and x.dim() > 1:
        x = x.transpose(-1, -2)
    if bval(a.get("transpose_y"), False) and y.dim() > 1:
        y = y.transpose(-1, -2)
    return torch.matmul(x, y)


def k_einsum(op, a):
    return torch.einsum(a["equation"], *a["values"])


def _norm_shape(x, axes, v):
    """Reshape a per-normalized-axes parameter so it broadcasts against ``x``."""
    shape = [1] * x.dim()
    for ax, d in zip(axes, v.shape if v.dim() == len(axes) else [v.numel()]):
        shape[ax] = d
    return v.reshape(shape)


def k_layer_norm(op, a):
    x = a["x"]
    axes = ilist(a.get("axes"))
    axes = list(range(x.dim())) if axes is None else sorted(ax % x.dim() for ax in axes)
    eps = fval(a.get("epsilon"), 1e-5)
    mean = x.mean(dim=axes, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=axes, keepdim=True)
    out = (x - mean) / torch.sqrt(var + eps)
    if a.get("gamma") is not None:
        out = out * _norm_shape(x, axes, a["gamma"])
    if a.get("beta") is not None:
        out = out + _norm_shape(x, axes, a["beta"])
    return out


def _per_channel(x, v):
    return v.reshape([1, -1] + [1] * (x.dim() - 2))


def k_batch_norm(op, a):
    x = a["x"]
    eps = fval(a.get("epsilon"), 1e-5)
    out = (x - _per_channel(x, a["mean"])) / torch.sqrt(_per_channel(x, a["variance"]) + eps)
    if a.get("gamma") is not None:
        out = out * _per_channel(x, a["gamma"])
    if a.get("beta") is not None:
        out = out + _per_channel(x, a["beta"])
    return out


def k_instance_norm(op, a):
    x = a["x"]
    dims = list(range(2, x.dim()))
    eps = fval(a.get("epsilon"), 1e-5)
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    out = (x - mean) / torch.sqrt(var + eps)
    if a.get("gamma") is not None:
        out = out * _per_channel(x, a["gamma"])
    if a.get("beta") is not None:
        out = out + _per_channel(x, a["beta"])
    return out


def _pool(a, x, pad_value):
    n = x.dim() - 2
    kernel = ilist(a["kernel_sizes"])
    strides = ilist(a.get("strides")) or [1] * n
    pads = _pads(a, list(x.shape[2:]), kernel, strides, [1] * n)
    return kernel, strides, pads


def k_max_pool(op, a):
    x = a["x"]
    kernel, strides, pads = _pool(a, x, float("-inf"))
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[x.dim() - 2]
    return fn(_apply_pads(x, pads, float("-inf")), kernel, strides,
              ceil_mode=bval(a.get("ceil_mode"), False))


def k_avg_pool(op, a):
    x = a["x"]
    kernel, strides, pads = _pool(a, x, 0.0)
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[x.dim() - 2]
    ceil = bval(a.get("ceil_mode"), False)
    summed = fn(_apply_pads(x, pads), kernel, strides, ceil_mode=ceil) * math.prod(kernel)
    if not bval(a.get("exclude_padding_from_average"), False):
        return summed / math.prod(kernel)
    ones = _apply_pads(torch.ones_like(x[:1, :1]), pads)
    count = fn(ones, kernel, strides, ceil_mode=ceil) * math.prod(kernel)
    return summed / count


def k_upsample_nearest_neighbor(op, a):
    x = a["x"]
    sh, sw = fval(a.get("scale_factor_height"), 1.0), fval(a.get("scale_factor_width"), 1.0)
    if sh.is_integer() and sw.is_integer():
        return x.repeat_interleave(int(sh), dim=-2).repeat_interleave(int(sw), dim=-1)
    return F.interpolate(x, scale_factor=(sh, sw), mode="nearest")


def k_upsample_bilinear(op, a):
    x = a["x"]
    sh, sw = fval(a.get("scale_factor_height"), 1.0), fval(a.get("scale_factor_width"), 1.0)
    return F.interpolate(x, scale_factor=(sh, sw), mode="bilinear",
                         align_corners=bval(a.get("align_corners"), False))


def k_sdpa(op, a):
    mask = a.get("attn_mask")
    return F.scaled_dot_product_attention(a["query"], a["key"], a["value"], attn_mask=mask)


REGISTRY = {
    "conv": k_conv, "conv_transpose": k_conv_transpose, "linear": k_linear, "matmul": k_matmul,
    "einsum": k_einsum, "layer_norm": k_layer_norm, "batch_norm": k_batch_norm,
    "instance_norm": k_instance_norm, "max_pool": k_max_pool, "avg_pool": k_avg_pool,
    "upsample_nearest_neighbor": k_upsample_nearest_neighbor,
    "upsample_bilinear": k_upsample_bilinear, "scaled_dot_product_attention": k_sdpa,
}
