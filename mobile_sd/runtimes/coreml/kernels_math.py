"""Elementwise, activation and reduction kernels (MIL iOS15-iOS18 semantics).

A kernel is ``fn(op, a) -> Tensor | tuple[Tensor, ...]``: ``op`` is the MIL operation (for
static attributes only), ``a`` maps input names to runtime values (torch tensors; a tuple input
is a list; strings stay ``str``). Floats arrive as fp32 tensors; the interpreter rounds each
result to the output var's dtype, so kernels never round themselves.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ival(v, default=None):
    """A scalar const (tensor / number / None) as a Python int."""
    if v is None:
        return default
    return int(v.item()) if isinstance(v, torch.Tensor) else int(v)


def fval(v, default=None):
    if v is None:
        return default
    return float(v.item()) if isinstance(v, torch.Tensor) else float(v)


def bval(v, default=False):
    if v is None:
        return default
    return bool(v.item()) if isinstance(v, torch.Tensor) else bool(v)


def ilist(v, default=None):
    """A 0-d/1-d const as a list of ints (None -> ``default``)."""
    if v is None:
        return default
    if isinstance(v, torch.Tensor):
        return [int(x) for x in v.reshape(-1).tolist()]
    return [int(x) for x in (v if isinstance(v, (list, tuple)) else [v])]


def _binary(fn):
    return lambda op, a: fn(a["x"], a["y"])


def _unary(fn):
    return lambda op, a: fn(a["x"])


def _floor_div(x, y):
    if x.is_floating_point() or y.is_floating_point():
        return torch.floor(x / y)
    return torch.div(x, y, rounding_mode="floor")


def _real_div(x, y):
    return x / y if (x.is_floating_point() or y.is_floating_point()) else torch.div(x, y)


BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "real_div": _real_div,
    "floor_div": _floor_div, "mod": torch.remainder, "pow": torch.pow,
    "maximum": torch.maximum, "minimum": torch.minimum,
    "equal": torch.eq, "not_equal": torch.ne, "greater": torch.gt, "greater_equal": torch.ge,
    "less": torch.lt, "less_equal": torch.le,
    "logical_and": torch.logical_and, "logical_or": torch.logical_or,
    "logical_xor": torch.logical_xor,
}

UNARY = {
    "abs": torch.abs, "acos": torch.acos, "asin": torch.asin, "atan": torch.atan,
    "atanh": torch.atanh, "ceil": torch.ceil, "cos": torch.cos, "cosh": torch.cosh,
    "erf": torch.erf, "exp": torch.exp, "exp2": torch.exp2, "floor": torch.floor,
    "logical_not": torch.logical_not, "round": torch.round, "sign": torch.sign,
    "sin": torch.sin, "sinh": torch.sinh, "sqrt": torch.sqrt, "square": torch.square,
    "tan": torch.tan, "tanh": torch.tanh, "identity": lambda x: x,
    "relu": torch.relu, "relu6": lambda x: torch.clamp(x, 0.0, 6.0), "sigmoid": torch.sigmoid,
    "silu": F.silu, "softsign": F.softsign,
}


def _eps(a, default):
    return fval(a.get("epsilon"), default)


def k_inverse(op, a):
    return 1.0 / (a["x"] + _eps(a, 1e-4))


def k_log(op, a):
    return torch.log(a["x"] + _eps(a, 1e-45))


def k_rsqrt(op, a):
    return torch.rsqrt(a["x"] + _eps(a, 1e-12))


def k_clip(op, a):
    return torch.clamp(a["x"], fval(a["alpha"]), fval(a["beta"]))


def k_threshold(op, a):
    return torch.clamp(a["x"], min=fval(a["alpha"]))


def k_gelu(op, a):
    mode = a.get("mode") or "EXACT"
    x = a["x"]
    if mode == "EXACT":
        return F.gelu(x)
    if mode == "TANH_APPROXIMATION":
        return F.gelu(x, approximate="tanh")
    if mode == "SIGMOID_APPROXIMATION":
        return x * torch.sigmoid(1.702 * x)
    raise ValueError(f"gelu mode {mode!r}")


def k_softmax(op, a):
    return torch.softmax(a["x"], dim=ival(a.get("axis"), -1))


def k_leaky_relu(op, a):
    return F.leaky_relu(a["x"], fval(a.get("alpha"), 0.01))


def k_elu(op, a):
    return F.elu(a["x"], fval(a.get("alpha"), 1.0))


def k_softplus(op, a):
    return F.softplus(a["x"])


def k_sigmoid_hard(op, a):
    alpha, beta = fval(a.get("alpha"), 0.2), fval(a.get("beta"), 0.5)
    return torch.clamp(alpha * a["x"] + beta, 0.0, 1.0)


def k_scaled_tanh(op, a):
    return fval(a.get("alpha"), 1.0) * torch.tanh(fval(a.get("beta"), 1.0) * a["x"])


def k_prelu(op, a):
    x, alpha = a["x"], a["alpha"]
    shape = [1] * x.dim()
    shape[1] = -1
    return torch.where(x >= 0, x, x * alpha.reshape(shape))


def _axes(a, x):
    axes = ilist(a.get("axes"))
    return list(range(x.dim())) if axes is None else [ax % max(x.dim(), 1) for ax in axes]


def _reduce(fn):
    def kernel(op, a):
        x = a["x"]
        return fn(x, _axes(a, x), bval(a.get("keep_dims"), False))
    return kernel


def _amax(x, dims, keep):
    return torch.amax(x, dim=dims, keepdim=keep) if dims else x


def _amin(x, dims, keep):
    return torch.amin(x, dim=dims, keepdim=keep) if dims else x


def _prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, dim=d, keepdim=keep)
    return x


REDUCE = {
    "reduce_mean": lambda x, d, k: torch.mean(x, dim=d, keepdim=k),
    "reduce_sum": lambda x, d, k: torch.sum(x, dim=d, keepdim=k),
    "reduce_max": _amax, "reduce_min": _amin, "reduce_prod": _prod,
    "reduce_sum_square": lambda x, d, k: torch.sum(x * x, dim=d, keepdim=k),
    "reduce_l1_norm": lambda x, d, k: torch.sum(torch.abs(x), dim=d, keepdim=k),
    "reduce_l2_norm": lambda x, d, k: torch.sqrt(torch.sum(x * x, dim=d, keepdim=k)),
    "reduce_log_sum": lambda x, d, k: torch.log(torch.sum(x, dim=d, keepdim=k)),
    "reduce_log_sum_exp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
}


def _arg(fn):
    def kernel(op, a):
        x = a["x"]
        axis = ival(a.get("axis"), -1)
        return fn(x, dim=axis, keepdim=bval(a.get("keep_dims"), False)).to(torch.int32)
    return kernel


REGISTRY = {name: _binary(fn) for name, fn in BINARY.items()}
REGISTRY.update({name: _unary(fn) for name, fn in UNARY.items()})
REGISTRY.update({name: _reduce(fn) for name, fn in REDUCE.items()})
REGISTRY.update({
    "inverse": k_inverse, "log": k_log, "rsqrt": k_rsqrt, "clip": k_clip,
    "threshold": k_threshold, "gelu": k_gelu, "softmax": k_softmax, "leaky_relu": k_leaky_relu,
    "elu": k_elu, "softplus": k_softplus, "sigmoid_hard": k_sigmoid_hard,
    "scaled_tanh": k_scaled_tanh, "prelu": k_prelu,
    "reduce_argmax": _arg(torch.argmax), "reduce_argmin": _arg(torch.argmin),
})
