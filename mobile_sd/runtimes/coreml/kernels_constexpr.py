"""Compressed-weight (constexpr_*) and (de)quantize kernels, expanded exactly as the ops define.

The interpreter evaluates constexpr ops once, when a program is prepared (their inputs are all
consts), in torch. Forms covered: iOS16 ``constexpr_lut_to_dense`` (1-D LUT, bit-packed
indices, ``shape``), iOS18 ``constexpr_lut_to_dense`` (per-tensor / per-grouped-channel /
vector LUTs), ``constexpr_affine_dequantize`` (iOS16), ``constexpr_blockwise_shift_scale``
(iOS18, int4/int8 per block), ``constexpr_cast``, ``constexpr_sparse_to_dense`` (both forms),
and the iOS17 runtime ``dequantize`` / ``quantize``.
"""
from __future__ import annotations

import math

import torch

from mobile_sd.runtimes.coreml.kernels_math import ilist, ival


def unpack_bits(packed: torch.Tensor, nbits: int, count: int) -> torch.Tensor:
    """Little-endian bit unpacking (LSB first), as coremltools' ``pack_elements_into_bits``."""
    bits = (packed.reshape(-1).to(torch.int64).unsqueeze(1) >> torch.arange(8)) & 1
    bits = bits.reshape(-1)[: count * nbits].reshape(count, nbits)
    return (bits << torch.arange(nbits)).sum(dim=1)


def _group_ids(shape, group_shape) -> torch.Tensor:
    """For each element of ``shape``: the flat index of its block in a ``group_shape`` grid."""
    gid = torch.zeros((), dtype=torch.int64)
    stride = 1
    for d in reversed(range(len(shape))):
        block = shape[d] // group_shape[d]
        ids = torch.arange(shape[d]) // block * stride
        gid = gid + ids.reshape([-1] + [1] * (len(shape) - 1 - d))
        stride *= group_shape[d]
    return gid.expand(shape) if len(shape) else gid


def lut_to_dense_ios18(indices: torch.Tensor, lut: torch.Tensor, vector_axis=None) -> torch.Tensor:
    rank = indices.dim()
    palette, vsize = lut.shape[-2], lut.shape[-1]
    groups = list(lut.shape[:rank])
    table = lut.reshape(-1, palette, vsize)                     # [G, P, V]
    gid = _group_ids(list(indices.shape), groups)
    flat = (gid * palette + indices.to(torch.int64)).reshape(-1)
    vals = table.reshape(-1, vsize)[flat].reshape(list(indices.shape) + [vsize])
    if vsize == 1:
        return vals.squeeze(-1)
    axis = vector_axis % rank
    out_shape = list(indices.shape)
    out_shape[axis] *= vsize
    return vals.movedim(-1, axis + 1).reshape(out_shape)


def k_constexpr_lut_to_dense(op, a):
    if "shape" in a:                                     # iOS16 form
        lut, shape = a["lut"], ilist(a["shape"])
        count = math.prod(shape)
        nbits = int(math.log2(lut.numel()))
        idx = unpack_bits(a["indices"], nbits, count)
        return lut.reshape(-1)[idx].reshape(shape)
    return lut_to_dense_ios18(a["indices"], a["lut"], ival(a.get("vector_axis")))


def _along_axis(v: torch.Tensor, rank: int, axis: int) -> torch.Tensor:
    if v.dim() == 0 or v.numel() == 1 and v.dim() <= 1:
        return v.reshape([])
    shape = [1] * rank
    shape[axis % rank] = -1
    return v.reshape(shape)


def dequantize(q, scale, zero_point, axis, rank):
    out = q.to(torch.float32)
    if zero_point is not None:
        out = out - _along_axis(zero_point.to(torch.float32), rank, axis or 0)
    return out * _along_axis(scale.to(torch.float32), rank, axis or 0)


def k_constexpr_affine_dequantize(op, a):
    q = a["quantized_data"]
    return dequantize(q, a["scale"], a["zero_point"], ival(a["axis"]), q.dim())


def k_dequantize(op, a):
    x = a["input"]
    return dequantize(x, a["scale"], a.get("zero_point"), ival(a.get("axis")), x.dim())


def k_quantize(op, a):
    x = a["input"]
    axis = ival(a.get("axis"))
    q = torch.round(x / _along_axis(a["scale"], x.dim(), axis or 0))
    if a.get("zero_point") is not None:
        q = q + _along_axis(a["zero_point"].to(torch.float32), x.dim(), axis or 0)
    lo, hi = (-128, 127) if a.get("output_dtype") == "int8" else (0, 255)
    return torch.clamp(q, lo, hi)


def _repeat_blocks(v: torch.Tensor, shape) -> torch.Tensor:
    for d, (n, m) in enumerate(zip(shape, v.shape)):
        if n != m:
            v = v.repeat_interleave(n // m, dim=d)
    return v


def k_constexpr_blockwise_shift_scale(op, a):
    data, scale = a["data"].to(torch.float32), a["scale"].to(torch.float32)
    shape = list(data.shape)
    if a.get("offset") is not None:
        data = data - _repeat_blocks(a["offset"].to(torch.float32), shape)
    return _repeat_blocks(scale, shape) * data


def k_constexpr_cast(op, a):
    return a["source_val"]


def k_constexpr_sparse_to_dense(op, a):
    nonzero = a["nonzero_data"]
    if "shape" in a:                                      # iOS16: bit-packed mask + shape
        shape = ilist(a["shape"])
        mask = unpack_bits(a["mask"], 1, math.prod(shape)).reshape(shape).bool()
    else:
        mask = a["mask"].bool()
    out = torch.zeros(mask.shape, dtype=nonzero.dtype)
    out[mask] = nonzero.reshape(-1)
    return out


REGISTRY = {
    "constexpr_lut_to_dense": k_constexpr_lut_to_dense,
    "constexpr_affine_dequantize": k_constexpr_affine_dequantize,
    "constexpr_blockwise_shift_scale": k_constexpr_blockwise_shift_scale,
    "constexpr_cast": k_constexpr_cast,
    "constexpr_sparse_to_dense": k_constexpr_sparse_to_dense,
    "dequantize": k_dequantize, "quantize": k_quantize,
}
