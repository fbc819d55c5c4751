"""Shape, indexing and data-movement kernels (MIL iOS15-iOS18 semantics)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mobile_sd.runtimes.coreml.kernels_math import bval, fval, ilist, ival


def k_cast(op, a):
    return a["x"]            # the interpreter converts to the output var's dtype (mode-aware)


def k_reshape(op, a):
    x, shape = a["x"], ilist(a["shape"])
    shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]   # iOS17: 0 copies
    return x.reshape(shape)


def k_transpose(op, a):
    return a["x"].permute(ilist(a["perm"]))


def k_expand_dims(op, a):
    x = a["x"]
    axes = ilist(a["axes"])
    rank = x.dim() + len(axes)
    for ax in sorted(ax % rank for ax in axes):
        x = x.unsqueeze(ax)
    return x


def k_squeeze(op, a):
    x = a["x"]
    axes = ilist(a.get("axes"))
    if axes is None:
        return x.reshape([d for d in x.shape if d != 1])
    drop = {ax % x.dim() for ax in axes}
    return x.reshape([d for i, d in enumerate(x.shape) if i not in drop])


def _mask(a, name, n):
    return [bool(b) for b in (ilist(a.get(name)) or [0] * n)]


def k_slice_by_index(op, a):
    x = a["x"]
    n = x.dim()
    begin, end = ilist(a["begin"]), ilist(a["end"])
    stride = ilist(a.get("stride")) or [1] * n
    bmask, emask, smask = _mask(a, "begin_mask", n), _mask(a, "end_mask", n), \
        _mask(a, "squeeze_mask", n)
    for d in range(n):
        size = x.shape[d]
        if smask[d]:
            idx = begin[d] % size
            x = x.narrow(d, idx, 1)
            continue
        s = stride[d]
        b = None if bmask[d] else begin[d]
        e = None if emask[d] else end[d]
        idx = range(*slice(b, e, s).indices(size))
        if s > 0:
            x = x[(slice(None),) * d + (slice(idx.start, idx.start + len(idx) * s, s),)] \
                if len(idx) else x.narrow(d, 0, 0)
        else:
            x = x.index_select(d, torch.tensor(list(idx), dtype=torch.long))
    if any(smask):
        x = x.reshape([dim for d, dim in enumerate(x.shape) if not smask[d]])
    return x


def k_slice_by_size(op, a):
    x = a["x"]
    for d, (b, s) in enumerate(zip(ilist(a["begin"]), ilist(a["size"]))):
        b = b + x.shape[d] if b < 0 else b
        x = x.narrow(d, b, x.shape[d] - b if s == -1 else s)
    return x


def k_split(op, a):
    x = a["x"]
    axis = ival(a["axis"]) % x.dim()
    sizes = ilist(a.get("split_sizes"))
    if sizes is None:
        n = ival(a["num_splits"])
        sizes = [x.shape[axis] // n] * n
    return tuple(torch.split(x, sizes, dim=axis))


def k_concat(op, a):
    values = list(a["values"])
    axis = ival(a["axis"]) % values[0].dim()
    if bval(a.get("interleave"), False) and len(values) > 1:
        stacked = torch.stack(values, dim=axis + 1)
        shape = list(values[0].shape)
        shape[axis] *= len(values)
        return stacked.reshape(shape)
    return torch.cat(values, dim=axis)


def k_stack(op, a):
    values = list(a["values"])
    return torch.stack(values, dim=ival(a["axis"]) % (values[0].dim() + 1))


def k_tile(op, a):
    return a["x"].repeat(ilist(a["reps"]))


def k_pad(op, a):
    x, pad = a["x"], ilist(a["pad"])
    mode = a.get("mode") or "constant"
    pairs = [(pad[2 * i], pad[2 * i + 1]) for i in range(len(pad) // 2)]
    torch_pad = [p for pair in reversed(pairs) for p in pair]
    if mode == "constant":
        return F.pad(x, torch_pad, value=fval(a.get("constant_val"), 0.0))
    torch_mode = {"reflect": "reflect", "replicate": "replicate"}[mode]
    return F.pad(x, torch_pad, mode=torch_mode)


def _gather0(x, idx, axis):
    idx = idx.long()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape(list(x.shape[:axis]) + list(idx.shape) + list(x.shape[axis + 1:]))


def k_gather(op, a):
    x, idx = a["x"], a["indices"]
    axis = ival(a.get("axis"), 0) % x.dim()
    bd = ival(a.get("batch_dims"), 0)
    if bval(a.get("validate_indices"), False):
        n = x.shape[axis]
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise IndexError(f"gather index out of range [-{n}, {n}) in op {op.name}")
    if bd == 0:
        return _gather0(x, idx, axis)
    lead = list(x.shape[:bd])
    xb = x.reshape([-1] + list(x.shape[bd:]))
    ib = idx.reshape([-1] + list(idx.shape[bd:]))
    out = torch.stack([_gather0(xb[i], ib[i], axis - bd) for i in range(xb.shape[0])])
    return out.reshape(lead + list(out.shape[1:]))


def k_gather_along_axis(op, a):
    x, idx = a["x"], a["indices"].long()
    axis = ival(a.get("axis"), 0) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    return torch.gather(x, axis, idx)


def k_gather_nd(op, a):
    x, idx = a["x"], a["indices"].long()
    bd = ival(a.get("batch_dims"), 0)
    if bd:
        lead = list(x.shape[:bd])
        xb = x.reshape([-1] + list(x.shape[bd:]))
        ib = idx.reshape([-1] + list(idx.shape[bd:]))
        out = torch.stack([xb[i][tuple(ib[i].unbind(-1))] for i in range(xb.shape[0])])
        return out.reshape(lead + list(out.shape[1:]))
    return x[tuple(idx.unbind(-1))]


def k_select(op, a):
    return torch.where(a["cond"].bool(), a["a"], a["b"])


def k_fill(op, a):
    value = a.get("value")
    value = 0.0 if value is None else value
    return torch.full(ilist(a["shape"]), value.item() if isinstance(value, torch.Tensor) else value)


def k_range_1d(op, a):
    start, end, step = a["start"], a["end"], a["step"]
    return torch.arange(start.item(), end.item(), step.item())


def k_shape(op, a):
    return torch.tensor(list(a["x"].shape), dtype=torch.int32)


def k_band_part(op, a):
    x = a["x"]
    lower, upper = ival(a.get("lower"), -1), ival(a.get("upper"), -1)
    m, n = x.shape[-2], x.shape[-1]
    i = torch.arange(m).unsqueeze(1)
    j = torch.arange(n).unsqueeze(0)
    keep = torch.ones(m, n, dtype=torch.bool)
    if lower >= 0:
        keep &= (i - j) <= lower
    if upper >= 0:
        keep &= (j - i) <= upper
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype))


def k_cumsum(op, a):
    x = a["x"]
    axis = ival(a.get("axis"), 0)
    if bval(a.get("reverse"), False):
        x = x.flip(axis)
    out = torch.cumsum(x, dim=axis)
    if bval(a.get("exclusive"), False):
        out = out - x
    return out.flip(axis) if bval(a.get("reverse"), False) else out


def k_flatten2d(op, a):
    x = a["x"]
    axis = ival(a.get("axis"), 1) % (x.dim() + 1)
    return x.reshape(int(torch.tensor(x.shape[:axis]).prod()), -1)


REGISTRY = {
    "cast": k_cast, "reshape": k_reshape, "transpose": k_transpose, "expand_dims": k_expand_dims,
    "squeeze": k_squeeze, "slice_by_index": k_slice_by_index, "slice_by_size": k_slice_by_size,
    "split": k_split, "concat": k_concat, "stack": k_stack, "tile": k_tile, "pad": k_pad,
    "gather": k_gather, "gather_along_axis": k_gather_along_axis, "gather_nd": k_gather_nd,
    "select": k_select, "fill": k_fill, "range_1d": k_range_1d, "shape": k_shape,
    "band_part": k_band_part, "cumsum": k_cumsum, "flatten2d": k_flatten2d,
}
