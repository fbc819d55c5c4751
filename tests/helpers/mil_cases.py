"""Kernel test cases for the MIL runtime: each builds one op with coremltools' MIL builder.

A case is ``(id, opset, build, ref)``: ``build()`` (called inside an ``mb.program``; given the
program's zero ``dummy`` input if it takes an argument) returns the
op's output var(s); ``ref`` is ``None`` when the op class computes the value itself
(``value_inference`` / constexpr ``materialized_val_inference``, numpy code in coremltools), else
a callable giving the expected numpy value(s) from torch / numpy reference code.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import coremltools as ct
from coremltools.converters.mil.mil import Builder as mb
from coremltools.converters.mil.mil import types
from coremltools.optimize import _utils as opt_utils

I15, I16, I17, I18 = ct.target.iOS15, ct.target.iOS16, ct.target.iOS17, ct.target.iOS18
RNG = np.random.default_rng(0)


def r(*shape, lo=-2.0, hi=2.0):
    return RNG.uniform(lo, hi, size=shape).astype(np.float32)


def t(x):
    return torch.from_numpy(np.asarray(x))


X, Y = r(2, 3, 4), r(2, 3, 4)
Y[0, 0, :2] = X[0, 0, :2]                       # equal entries for comparisons
P, Q = r(2, 3, 4, lo=0.2, hi=3.0), r(2, 3, 4, lo=0.2, hi=3.0)
U = r(2, 3, 4, lo=-0.9, hi=0.9)
B1, B2 = RNG.random((2, 3)) > 0.5, RNG.random((2, 3)) > 0.5
IMG = r(1, 4, 7, 6)

BINARY = ["add", "sub", "mul", "maximum", "minimum", "equal", "not_equal", "greater",
          "greater_equal", "less", "less_equal"]
UNARY = ["abs", "ceil", "cos", "cosh", "erf", "exp", "exp2", "floor", "round", "sign", "sin",
         "sinh", "square", "tan", "tanh", "relu", "sigmoid", "softsign", "atan"]
UNIT = ["acos", "asin", "atanh"]
POSITIVE = ["sqrt", "rsqrt", "log", "inverse"]
REDUCE = ["reduce_mean", "reduce_sum", "reduce_max", "reduce_min", "reduce_prod",
          "reduce_sum_square", "reduce_l1_norm", "reduce_l2_norm", "reduce_log_sum_exp"]


def _op(name):
    return getattr(mb, name)


def lut16_case():
    lut = np.sort(r(16)).astype(np.float16)
    idx = RNG.integers(0, 16, size=(6, 5)).astype(np.uint8)
    packed = opt_utils.pack_elements_into_bits(idx, 4)
    return lambda: mb.constexpr_lut_to_dense(lut=lut, indices=packed, shape=np.uint32([6, 5]))


def lut18_case(lut_shape, idx_shape, nbits, vector_axis=None):
    lut = r(*lut_shape).astype(np.float16)
    idx = RNG.integers(0, 2 ** nbits, size=idx_shape).astype(types.nptype_from_builtin(
        types.string_to_builtin(f"uint{nbits}")))
    kw = {} if vector_axis is None else {"vector_axis": np.int32(vector_axis)}
    return lambda: mb.constexpr_lut_to_dense(indices=idx, lut=lut, **kw)


def blockwise_case(with_offset: bool):
    data = RNG.integers(-8, 8, size=(8, 12)).astype(types.nptype_from_builtin(types.int4))
    scale = r(4, 3, lo=0.01, hi=0.1).astype(np.float16)
    offset = RNG.integers(-2, 2, size=(4, 3)).astype(types.nptype_from_builtin(types.int4))
    kw = {"offset": offset} if with_offset else {}
    return lambda: mb.constexpr_blockwise_shift_scale(data=data, scale=scale, **kw)


def sparse16_case():
    mask = RNG.random((4, 6)) > 0.5
    data = r(int(mask.sum())).astype(np.float16)
    packed = opt_utils.pack_elements_into_bits(mask.astype(np.uint8), 1)
    return lambda: mb.constexpr_sparse_to_dense(nonzero_data=data, mask=packed,
                                                shape=np.uint32([4, 6])), \
        lambda: _scatter(mask, data)


def _scatter(mask, data):
    out = np.zeros(mask.shape, np.float32)
    out[mask] = data.astype(np.float32)
    return out


def sparse18_case():
    mask = (RNG.random((4, 6)) > 0.5).astype(types.nptype_from_builtin(types.uint1))
    data = r(int(mask.sum())).astype(np.float16)
    return lambda: mb.constexpr_sparse_to_dense(nonzero_data=data, mask=mask), None


def conv_ref(x, w, b=None, stride=1, pad=(0, 0, 0, 0), dil=1, groups=1):
    xp = F.pad(t(x), [pad[2], pad[3], pad[0], pad[1]])
    return F.conv2d(xp, t(w), None if b is None else t(b), stride=stride, dilation=dil,
                    groups=groups).numpy()


W33, W_G, BIAS = r(5, 4, 3, 3), r(4, 2, 3, 3), r(5)
GAMMA, BETA = r(3), r(3)
Q4, K4, V4 = r(1, 2, 5, 8), r(1, 2, 6, 8), r(1, 2, 6, 8)
CT_W = r(4, 3, 3, 3)
EIN = (r(2, 7, 3, 6), r(2, 6, 3, 5))            # the two split-einsum forms of the exports
EIN2 = (r(2, 6, 3, 7), r(2, 7, 3, 5))
BN = (r(4), r(4, lo=0.5, hi=2.0), r(4), r(4))      # mean, variance, gamma, beta
IN_GB = (r(4), r(4))


def cases():
    out = []
    for name in BINARY:
        out.append((name, I15, lambda n=name: _op(n)(x=X, y=Y), None))
    out += [("real_div", I15, lambda: mb.real_div(x=X, y=P), None),
            ("floor_div", I15, lambda: mb.floor_div(x=X, y=P), None),
            ("mod", I15, lambda: mb.mod(x=X, y=P), None),
            ("pow", I15, lambda: mb.pow(x=P, y=Y), None)]
    for name in ("logical_and", "logical_or", "logical_xor"):
        out.append((name, I15, lambda n=name: _op(n)(x=B1, y=B2), None))
    out.append(("logical_not", I15, lambda: mb.logical_not(x=B1), None))
    for name in UNARY:
        out.append((name, I15, lambda n=name: _op(n)(x=X), None))
    for name in UNIT:
        out.append((name, I15, lambda n=name: _op(n)(x=U), None))
    for name in POSITIVE:
        out.append((name, I15, lambda n=name: _op(n)(x=P), None))
    out += [
        ("identity", I15, lambda: mb.identity(x=X), lambda: X),
        ("relu6", I15, lambda: mb.relu6(x=X * 4), None),
        ("silu", I15, lambda: mb.silu(x=X), lambda: F.silu(t(X)).numpy()),
        ("clip", I15, lambda: mb.clip(x=X, alpha=np.float32(-0.5), beta=np.float32(0.7)), None),
        ("threshold", I15, lambda: mb.threshold(x=X, alpha=np.float32(0.3)), None),
        ("gelu", I15, lambda: mb.gelu(x=X), None),
        ("gelu", I15, lambda: mb.gelu(x=X, mode="TANH_APPROXIMATION"), None),
        ("gelu", I15, lambda: mb.gelu(x=X, mode="SIGMOID_APPROXIMATION"), None),
        ("softmax", I15, lambda: mb.softmax(x=X, axis=1), None),
        ("leaky_relu", I15, lambda: mb.leaky_relu(x=X, alpha=np.float32(0.1)), None),
        ("elu", I15, lambda: mb.elu(x=X, alpha=np.float32(0.5)), None),
        ("softplus", I15, lambda: mb.softplus(x=X), None),
        ("sigmoid_hard", I15, lambda: mb.sigmoid_hard(x=X, alpha=np.float32(0.3),
                                                     beta=np.float32(0.4)), None),
        ("scaled_tanh", I15, lambda: mb.scaled_tanh(x=X, alpha=np.float32(1.5),
                                                   beta=np.float32(0.5)), None),
        ("prelu", I15, lambda: mb.prelu(x=IMG, alpha=np.float32([0.1, 0.2, 0.3, 0.4])), None),
    ]
    for name in REDUCE:
        out.append((name, I15, lambda n=name: _op(n)(x=P, axes=[1, -1], keep_dims=True), None))
    out += [("reduce_mean", I15, lambda: mb.reduce_mean(x=X), None),
            ("reduce_log_sum", I15, lambda: mb.reduce_log_sum(x=P, axes=[0]), None),
            ("reduce_argmax", I15, lambda: mb.reduce_argmax(x=X, axis=1), None),
            ("reduce_argmin", I15, lambda: mb.reduce_argmin(x=X, axis=-1, keep_dims=True), None)]
    out += tensor_cases() + nn_cases() + constexpr_cases()
    return out


def tensor_cases():
    idx = np.int32([[2, 0], [1, 1]])
    return [
        ("cast", I15, lambda: mb.cast(x=X * 3, dtype="int32"), None),
        ("reshape", I15, lambda: mb.reshape(x=X, shape=[4, -1]), None),
        ("reshape", I17, lambda: mb.reshape(x=X, shape=[0, -1]), lambda: X.reshape(2, 12)),
        ("transpose", I15, lambda: mb.transpose(x=X, perm=[2, 0, 1]), None),
        ("expand_dims", I15, lambda: mb.expand_dims(x=X, axes=[0, -1]), None),
        ("squeeze", I15, lambda: mb.squeeze(x=X[:1, :, None]), None),
        ("squeeze", I15, lambda: mb.squeeze(x=X[:1, :, None], axes=[-2]), None),
        ("slice_by_index", I15, lambda: mb.slice_by_index(
            x=X, begin=[1, 0, 3], end=[2, 3, 0], stride=[1, 2, -1], begin_mask=[False, True, False],
            end_mask=[False, False, True], squeeze_mask=[True, False, False]), None),
        ("slice_by_index", I15, lambda: mb.slice_by_index(x=X, begin=[0, 1, 0], end=[2, -1, 4]),
         None),
        ("slice_by_size", I15, lambda: mb.slice_by_size(x=X, begin=[1, 0, 1], size=[1, -1, 2]),
         None),
        ("split", I15, lambda: mb.split(x=X, num_splits=2, axis=-1), None),
        ("split", I15, lambda: mb.split(x=X, split_sizes=[1, 2], axis=1), None),
        ("concat", I15, lambda: mb.concat(values=[X, Y], axis=1), None),
        # coremltools' concat value_inference ignores interleave: reference from the op doc
        ("concat", I15, lambda: mb.concat(values=[X, Y], axis=2, interleave=True),
         lambda: np.stack([X, Y], axis=3).reshape(2, 3, 8)),
        ("stack", I15, lambda: mb.stack(values=[X, Y], axis=1), None),
        ("tile", I15, lambda: mb.tile(x=X, reps=[1, 2, 3]), None),
        ("pad", I15, lambda: mb.pad(x=X, pad=np.int32([1, 0, 2, 1]), constant_val=np.float32(0.5)),
         None),
        ("pad", I15, lambda: mb.pad(x=X, pad=np.int32([1, 2]), mode="reflect"), None),
        ("pad", I15, lambda: mb.pad(x=X, pad=np.int32([2, 1]), mode="replicate"), None),
        ("gather", I15, lambda: mb.gather(x=X, indices=idx, axis=1), None),
        ("gather", I17, lambda: mb.gather(x=X, indices=np.int32([[2, 0, 1], [1, 1, 0]]), axis=1,
                                          batch_dims=1, validate_indices=True), None),
        ("gather_along_axis", I15, lambda: mb.gather_along_axis(
            x=X, indices=RNG.integers(0, 4, size=(2, 3, 2)).astype(np.int32), axis=2), None),
        ("gather_nd", I15, lambda: mb.gather_nd(x=X, indices=np.int32([[1, 2], [0, 1]])),
         lambda: X[[1, 0], [2, 1]]),
        ("select", I15, lambda: mb.select(cond=X > 0, a=X, b=Y), None),
        ("fill", I15, lambda: mb.fill(shape=np.int32([2, 3]), value=np.float32(1.5)), None),
        ("range_1d", I15, lambda: mb.range_1d(start=np.float32(1.0), end=np.float32(4.0),
                                              step=np.float32(0.5)), None),
        ("shape", I15, lambda: mb.shape(x=X), None),
        ("band_part", I15, lambda: mb.band_part(x=X, lower=np.int32(1), upper=np.int32(0)), None),
        ("cumsum", I15, lambda: mb.cumsum(x=X, axis=1, reverse=True), None),
        # coremltools' value_inference crashes for exclusive=True: a non-const input (x + dummy
        # zero) keeps it from running; numpy reference
        ("cumsum", I15, lambda dummy: mb.cumsum(x=mb.add(x=X, y=dummy), axis=1, exclusive=True,
                                                reverse=True),
         lambda: np.flip(np.cumsum(np.flip(X, 1), 1), 1) - X),
        ("flatten2d", I15, lambda: mb.flatten2d(x=X, axis=2), None),
    ]


def nn_cases():
    return [
        ("conv", I15, lambda: mb.conv(x=IMG, weight=W33, bias=BIAS, pad_type="valid"),
         lambda: conv_ref(IMG, W33, BIAS)),
        ("conv", I15, lambda: mb.conv(x=IMG, weight=W33, pad_type="same", strides=[2, 2]),
         lambda: conv_ref(IMG, W33, stride=2, pad=(1, 1, 0, 1))),
        ("conv", I16, lambda: mb.conv(x=IMG, weight=W33, pad_type="same_lower", strides=[2, 2]),
         lambda: conv_ref(IMG, W33, stride=2, pad=(1, 1, 1, 0))),
        ("conv", I15, lambda: mb.conv(x=IMG, weight=W_G, pad_type="custom", pad=[1, 0, 2, 1],
                                      dilations=[1, 2], groups=2),
         lambda: conv_ref(IMG, W_G, pad=(1, 0, 2, 1), dil=(1, 2), groups=2)),
        ("conv_transpose", I15, lambda: mb.conv_transpose(x=IMG, weight=CT_W, strides=[2, 2]),
         lambda: F.conv_transpose2d(t(IMG), t(CT_W), stride=2).numpy()),
        ("linear", I15, lambda: mb.linear(x=X, weight=r(5, 4), bias=r(5)), None),
        ("matmul", I15, lambda: mb.matmul(x=X, y=r(2, 5, 4), transpose_y=True), None),
        ("einsum", I15, lambda: mb.einsum(values=EIN, equation="bkhc,bchq->bkhq"),
         lambda: np.einsum("bkhc,bchq->bkhq", *EIN)),
        ("einsum", I15, lambda: mb.einsum(values=EIN2, equation="bchk,bkhq->bchq"),
         lambda: np.einsum("bchk,bkhq->bchq", *EIN2)),
        ("layer_norm", I15, lambda: mb.layer_norm(x=X, axes=[-1], epsilon=np.float32(1e-5)), None),
        ("layer_norm", I15, lambda: mb.layer_norm(x=X[:, :, None, :], axes=[1], gamma=GAMMA,
                                                  beta=BETA, epsilon=np.float32(1e-5)),
         lambda: ln_ref(X[:, :, None, :], 1)),
        ("batch_norm", I15, lambda: mb.batch_norm(x=IMG, mean=BN[0], variance=BN[1],
                                                  gamma=BN[2], beta=BN[3]),
         lambda: F.batch_norm(t(IMG), *map(t, BN[:2]), *map(t, BN[2:]), eps=1e-5).numpy()),
        ("instance_norm", I15, lambda: mb.instance_norm(x=IMG, gamma=IN_GB[0], beta=IN_GB[1]),
         lambda: F.instance_norm(t(IMG), weight=t(IN_GB[0]), bias=t(IN_GB[1]), eps=1e-5).numpy()),
        ("max_pool", I15, lambda: mb.max_pool(x=IMG, kernel_sizes=[3, 2], strides=[2, 2],
                                              pad_type="valid"),
         lambda: F.max_pool2d(t(IMG), (3, 2), (2, 2)).numpy()),
        ("avg_pool", I15, lambda: mb.avg_pool(x=IMG, kernel_sizes=[3, 3], strides=[1, 1],
                                              pad_type="same", exclude_padding_from_average=True),
         lambda: F.avg_pool2d(t(IMG), 3, 1, padding=1, count_include_pad=False).numpy()),
        ("upsample_nearest_neighbor", I15, lambda: mb.upsample_nearest_neighbor(
            x=IMG, scale_factor_height=2, scale_factor_width=2),
         lambda: F.interpolate(t(IMG), scale_factor=2, mode="nearest").numpy()),
        ("upsample_bilinear", I16, lambda: mb.upsample_bilinear(
            x=IMG, scale_factor_height=2.0, scale_factor_width=2.0, align_corners=False,
            half_pixel_centers=True),
         lambda: F.interpolate(t(IMG), scale_factor=2, mode="bilinear").numpy()),
        ("scaled_dot_product_attention", I18, lambda: mb.scaled_dot_product_attention(
            query=Q4, key=K4, value=V4),
         lambda: F.scaled_dot_product_attention(t(Q4), t(K4), t(V4)).numpy()),
    ]



def ln_ref(x, axis):
    m = x.mean(axis=axis, keepdims=True)
    v = ((x - m) ** 2).mean(axis=axis, keepdims=True)
    shape = [1] * x.ndim
    shape[axis] = -1
    return (x - m) / np.sqrt(v + 1e-5) * GAMMA.reshape(shape) + BETA.reshape(shape)


def constexpr_cases():
    qd = RNG.integers(0, 255, size=(6, 5)).astype(np.uint8)
    s16, s16_ref = sparse16_case()
    s18, _ = sparse18_case()
    return [
        ("constexpr_lut_to_dense", I16, lut16_case(), None),
        ("constexpr_lut_to_dense", I18, lut18_case((1, 1, 16, 1), (6, 5), 4), None),
        ("constexpr_lut_to_dense", I18, lut18_case((3, 1, 1, 1, 64, 1), (12, 4, 3, 3), 6), None),
        ("constexpr_lut_to_dense", I18, lut18_case((2, 1, 4, 3), (6, 2), 2, vector_axis=1), None),
        ("constexpr_lut_to_dense", I18, lut18_case((1, 2, 4, 2), (4, 6), 2, vector_axis=0), None),
        ("constexpr_affine_dequantize", I16, lambda: mb.constexpr_affine_dequantize(
            quantized_data=qd, zero_point=RNG.integers(100, 150, size=6).astype(np.uint8),
            scale=r(6, lo=0.01, hi=0.1), axis=np.int32(0)), None),
        ("constexpr_affine_dequantize", I16, lambda: mb.constexpr_affine_dequantize(
            quantized_data=qd.astype(np.int8), zero_point=np.int8(3), scale=np.float32(0.05),
            axis=np.int32(1)), None),
        ("constexpr_blockwise_shift_scale", I18, blockwise_case(True), None),
        ("constexpr_blockwise_shift_scale", I18, blockwise_case(False), None),
        ("constexpr_cast", I16, lambda: mb.constexpr_cast(source_val=r(3, 4).astype(np.float16),
                                                          output_dtype="fp32"), None),
        ("constexpr_sparse_to_dense", I16, s16, s16_ref),
        ("constexpr_sparse_to_dense", I18, s18, None),
        ("dequantize", I17, lambda: mb.dequantize(input=qd.astype(np.int8), scale=np.float32(0.1),
                                                  zero_point=np.int8(2)),
         lambda: (qd.astype(np.int8).astype(np.float32) - 2) * np.float32(0.1)),
        ("quantize", I17, lambda: mb.quantize(input=X, scale=np.float32(0.05),
                                              zero_point=np.uint8(128), output_dtype="uint8"),
         None),
    ]
