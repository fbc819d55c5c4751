"""Delegation summary of a lowered ExecuTorch program: what each backend took, what it left.

Counts come from ``executorch.devtools.backend_debug.get_delegation_info``; the per-backend
partition count reads each lowered module's ``backend_id``. ``getitem`` nodes (one per delegate
output) are bookkeeping, not kernels: they are left out of ``portable_ops``.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch

_BOOKKEEPING = ("getitem",)


def delegation_summary(graph_module: torch.fx.GraphModule) -> dict[str, Any]:
    """JSON-able summary of a lowered graph (``edge.exported_program().graph_module``).

    Example (not run by the tests: it needs real artifacts)::

        summary = delegation_summary(edge.exported_program().graph_module)
        summary["partitions"], summary["portable_ops"]
        # -> ({'XnnpackBackend': 2}, {'aten_arange_start_step': 1, ...})
    """
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(graph_module)
    partitions: Counter[str] = Counter()
    for node in graph_module.graph.nodes:
        if node.op == "get_attr" and node.name.startswith("lowered_module_"):
            partitions[getattr(graph_module, node.target).backend_id] += 1
    portable = {op: b.non_delegated for op, b in sorted(info.delegation_by_operator.items())
                if b.non_delegated and op not in _BOOKKEEPING}
    delegated = {op: b.delegated for op, b in sorted(info.delegation_by_operator.items())
                 if b.delegated}
    return {
        "partitions": dict(partitions),
        "num_partitions": info.num_delegated_subgraphs,
        "delegated_ops": info.num_delegated_nodes,
        "non_delegated_ops": sum(portable.values()),
        "portable_ops": portable,
        "delegated_by_op": delegated,
    }
