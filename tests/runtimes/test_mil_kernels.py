"""Every MIL kernel against coremltools' own numpy value inference (or a torch/numpy reference
where the op class has none): one op per program, run through the real interpreter."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import coremltools as ct
from coremltools.converters.mil.mil import Builder as mb

from mobile_sd.runtimes.coreml import REGISTRY, run_program
from mobile_sd.runtimes.coreml.kernels_constexpr import unpack_bits

from tests.helpers.mil_cases import cases

CASES = cases()


def _program(build, opset):
    holder = {}

    @mb.program(input_specs=[mb.TensorSpec(shape=(1,))], opset_version=opset)
    def prog(dummy):
        code = build.__code__
        out = build(dummy) if "dummy" in code.co_varnames[:code.co_argcount] else build()
        holder["outs"] = list(out) if isinstance(out, (list, tuple)) else [out]
        return out
    return prog, holder["outs"]


def _expected(var):
    """coremltools' numpy value: value_inference (.val) or constexpr materialization."""
    if var.val is not None:
        return np.asarray(var.val)
    op = var.op
    if op.op_type.startswith("constexpr_") and hasattr(op, "materialized_val_inference"):
        return np.asarray(op.materialized_val_inference())
    return None


def test_every_registered_kernel_has_a_case():
    tested = {c[0] for c in CASES}
    assert set(REGISTRY) - tested == set()


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_kernel_matches_reference(case):
    op_type, opset, build, ref = case
    prog, outs = _program(build, opset)
    ops = [op.op_type for op in prog.functions["main"].operations]
    assert op_type in ops, f"builder emitted {ops}, not {op_type}"
    # typed mode: each output in its declared dtype, like coremltools' numpy value inference
    got = run_program(prog, {"dummy": np.zeros(1, np.float32)}, mode="typed")
    refs = ref() if ref is not None else [_expected(v) for v in outs]
    refs = list(refs) if isinstance(refs, (list, tuple)) else [refs]
    assert len(refs) == len(outs)
    for var, want in zip(outs, refs):
        assert want is not None, f"{op_type}: coremltools gives no value; the case needs a reference"
        have = got[var.name].numpy()
        want = np.asarray(want)
        assert have.shape == want.shape, (op_type, have.shape, want.shape)
        if want.dtype == bool or np.issubdtype(want.dtype, np.integer):
            np.testing.assert_array_equal(have, want.astype(have.dtype))
        else:
            np.testing.assert_allclose(have, want.astype(np.float32), rtol=2e-5, atol=2e-5)


def test_unpack_bits_matches_coremltools_packing():
    from coremltools.optimize import _utils as opt_utils

    rng = np.random.default_rng(1)
    for nbits in (1, 2, 3, 4, 6, 8):
        values = rng.integers(0, 2 ** nbits, size=37).astype(np.uint8)
        packed = opt_utils.pack_elements_into_bits(values, nbits)
        got = unpack_bits(torch.from_numpy(packed), nbits, values.size).numpy()
        np.testing.assert_array_equal(got, values)


def test_typed_mode_rounds_fp16_vars_and_fp32_mode_does_not():
    x = np.float32([1.0 + 2 ** -12, 3.14159274, 70000.0, 1e-8])

    @mb.program(input_specs=[mb.TensorSpec(shape=(4,))], opset_version=ct.target.iOS17)
    def prog(a):
        h = mb.cast(x=a, dtype="fp16")
        return mb.cast(x=h, dtype="fp32")

    typed = run_program(prog, {"a": x}, mode="typed")
    wide = run_program(prog, {"a": x}, mode="fp32")
    out = list(typed)[0]
    np.testing.assert_array_equal(typed[out].numpy(), x.astype(np.float16).astype(np.float32))
    assert np.isinf(typed[out].numpy()[2]) and typed[out].numpy()[3] == 0.0
    np.testing.assert_array_equal(wide[out].numpy(), x)
