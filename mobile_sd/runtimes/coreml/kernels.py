"""The kernel registry: MIL op type -> torch kernel ``fn(op, args) -> Tensor | tuple``.

Kernels live in ``kernels_math`` (elementwise, activations, reductions), ``kernels_tensor``
(shape / indexing), ``kernels_nn`` (linear, conv, norms, pooling, resampling, attention) and
``kernels_constexpr`` (compressed weights, (de)quantize). All are vectorized torch code.
"""
from __future__ import annotations

from mobile_sd.runtimes.coreml import kernels_constexpr, kernels_math, kernels_nn, kernels_tensor

REGISTRY: dict = {}
for _module in (kernels_math, kernels_tensor, kernels_nn, kernels_constexpr):
    REGISTRY.update(_module.REGISTRY)

#: op types with no kernel that the interpreter still understands (values come from the spec)
STRUCTURAL = frozenset({"const"})


def supported_op_types() -> list[str]:
    return sorted(REGISTRY)
