"""BundledProgram (``.bpte``): a program plus reference inputs and expected outputs.

A device runner (or :func:`verify_bundled` here) loads the bundle, runs each test case and
compares with the expected outputs, so an artifact carries its own parity check.

With weights in a ``.ptd`` the native verifier cannot be used (``BundledModule`` has no way to
receive the data file and crashes), so the comparison is then done in Python on the same bundled
inputs: the bundle is deserialized, its program run with the ``.ptd``, and each output compared.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mobile_sd.errors import InvalidArgumentError


def _as_list(outputs: Any) -> list:
    return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]


def bundled_bytes(pte_path: str | Path, cases: Sequence[tuple]) -> bytes:
    """Serialize the ``.pte`` at ``pte_path`` with ``(inputs, expected_outputs)`` test cases.

    From the written file, not the program manager: the caller can free the lowered program
    (and its copies of the weights) first.
    """
    from executorch.devtools.bundled_program.config import MethodTestCase, MethodTestSuite
    from executorch.devtools.bundled_program.core import BundledProgram
    from executorch.devtools.bundled_program.serialize import (
        serialize_from_bundled_program_to_flatbuffer)

    tests = [MethodTestCase(inputs=list(inputs), expected_outputs=_as_list(expected))
             for inputs, expected in cases]
    bundle = BundledProgram(None, [MethodTestSuite("forward", tests)],
                            pte_file_path=str(pte_path))
    return serialize_from_bundled_program_to_flatbuffer(bundle)


def _tensor(value) -> torch.Tensor:
    from executorch.exir.scalar_type import ScalarType

    tensor = value.val
    dtypes = {ScalarType.FLOAT: np.float32, ScalarType.HALF: np.float16,
              ScalarType.DOUBLE: np.float64, ScalarType.LONG: np.int64, ScalarType.INT: np.int32,
              ScalarType.BOOL: np.bool_, ScalarType.CHAR: np.int8, ScalarType.BYTE: np.uint8}
    array = np.frombuffer(tensor.data, dtype=dtypes[ScalarType(tensor.scalar_type)])
    return torch.from_numpy(array.copy().reshape(tensor.sizes))


def _python_verify(buffer: bytes, data_path: Path, atol: float, rtol: float) -> list[dict]:
    from executorch.devtools.bundled_program.serialize import (
        deserialize_from_flatbuffer_to_bundled_program)
    from executorch.runtime import Runtime

    bundle = deserialize_from_flatbuffer_to_bundled_program(buffer)
    method = Runtime.get().load_program(bundle.program, data_path=data_path).load_method("forward")
    results = []
    for case in bundle.method_test_suites[0].test_cases:
        outputs = method.execute([_tensor(v) for v in case.inputs])
        expected = [_tensor(v) for v in case.expected_outputs]
        errs = [float((o.float() - e.float()).abs().max()) for o, e in zip(outputs, expected)]
        ok = all(torch.allclose(o.float(), e.float(), atol=atol, rtol=rtol)
                 for o, e in zip(outputs, expected))
        results.append({"passed": ok, "max_abs_err": max(errs, default=0.0)})
    return results


def _native_verify(buffer: bytes, atol: float, rtol: float) -> list[dict]:
    from executorch.extension.pybindings import portable_lib

    from executorch.devtools.bundled_program.serialize import (
        deserialize_from_flatbuffer_to_bundled_program)

    cases = len(deserialize_from_flatbuffer_to_bundled_program(buffer)
                .method_test_suites[0].test_cases)
    bundle = portable_lib._load_bundled_program_from_buffer(buffer)
    results = []
    for index in range(cases):
        try:
            bundle.verify_result_with_bundled_expected_output("forward", index, rtol, atol)
            results.append({"passed": True})
        except RuntimeError as exc:  # the runtime reports a mismatch as a failed status
            results.append({"passed": False, "error": str(exc)})
    return results


def verify_bundled(bpte_path: str | Path, atol: float = 1e-4, rtol: float = 1e-4,
                   data_path: str | Path | None = None) -> dict:
    """Run every bundled test case on the host; ``{"passed": bool, "cases": [...], "verifier"}``.

    Uses ExecuTorch's native verifier (``verify_result_with_bundled_expected_output``, the code
    a device runner uses) unless the program needs a ``.ptd`` (``<name>.ptd`` beside the bundle,
    or ``data_path``), then the Python comparison described in the module docstring.

    Example (not run by the tests: it needs real artifacts)::

        verify_bundled("out/unet.bpte", atol=1e-4)["passed"]
        # -> True
    """
    bpte_path = Path(bpte_path)
    if not bpte_path.is_file():
        raise InvalidArgumentError(f"{bpte_path}: no such .bpte file")
    buffer = bpte_path.read_bytes()
    from executorch.devtools.bundled_program.serialize import (
        deserialize_from_flatbuffer_to_bundled_program)

    from mobile_sd.runtimes.pte import check_runnable
    check_runnable(deserialize_from_flatbuffer_to_bundled_program(buffer).program, str(bpte_path))
    ptd = Path(data_path) if data_path else bpte_path.with_suffix(".ptd")
    if ptd.is_file():
        cases, verifier = _python_verify(buffer, ptd, atol, rtol), "python"
    else:
        cases, verifier = _native_verify(buffer, atol, rtol), "native"
    return {"passed": bool(cases) and all(c["passed"] for c in cases), "cases": cases,
            "verifier": verifier}
