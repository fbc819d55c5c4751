"""Turn lowering failures on an unsupported op into :class:`UnsupportedOpError`.

ExecuTorch reports such ops in a few shapes, depending on the stage that trips:

- ``to_executorch``: ``RuntimeError: Missing out variants: {'ns::op'}`` (no portable kernel and
  no backend took it);
- the edge verifier: ``SpecViolationError`` naming ``Operator: <EdgeOpOverload: aten.x.y>`` or
  ``Operator torch._ops.aten.x.y is not Aten Canonical``.

The op name is looked up in the exported graph to say where it comes from: the innermost
``nn_module_stack`` entry (module path and class) and the last frame of ``stack_trace``.
"""
from __future__ import annotations

import re

import torch

from mobile_sd.errors import UnsupportedOpError

_PATTERNS = (
    re.compile(r"Missing out variants: \{([^}]*)\}"),
    re.compile(r"Operator: <EdgeOpOverload: ([\w.:]+)>"),
    re.compile(r"Operator (?:torch\._ops\.)?([\w.:]+) is not (?:Aten Canonical|supported)"),
)


def unsupported_ops_in(message: str) -> list[str]:
    """Op names an ExecuTorch lowering error message complains about ('ns.op' form)."""
    names: list[str] = []
    for pattern in _PATTERNS:
        for match in pattern.finditer(message):
            for raw in match.group(1).split(","):
                name = raw.strip().strip("'\"").replace("::", ".")
                if name and name not in names:
                    names.append(name)
    return names


def _matches(node: torch.fx.Node, op: str) -> bool:
    # OpOverload / EdgeOpOverload: __name__ is "ns.op.overload"; str() of an edge op is a repr.
    target = getattr(node.target, "__name__", str(node.target)).replace("::", ".")
    return target == op or target.startswith(f"{op}.") or op.startswith(f"{target}.")


def where_from(graph: torch.fx.Graph, op: str) -> str:
    """'module path (Class), file:line' for the first node calling ``op``, or 'unknown'."""
    for node in graph.nodes:
        if node.op != "call_function" or not _matches(node, op):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        module = "<top level>"
        if stack:
            path, cls = list(stack.values())[-1]
            cls_name = getattr(cls, "__name__", str(cls)).rsplit(".", 1)[-1]
            module = f"{path or '<top level>'} ({cls_name})"
        trace = (node.meta.get("stack_trace") or "").strip().splitlines()
        frame = next((line.strip() for line in reversed(trace) if line.strip().startswith("File")),
                     "")
        return f"{module}; {frame}" if frame else module
    return "unknown location"


def translate(exc: Exception, graph: torch.fx.Graph, backend: str) -> UnsupportedOpError | None:
    """An UnsupportedOpError for ``exc`` if it is about unsupported ops, else None."""
    ops = unsupported_ops_in(str(exc))
    if not ops:
        return None
    where = "; ".join(f"{op} at {where_from(graph, op)}" for op in ops)
    return UnsupportedOpError(
        f"no kernel for {', '.join(ops)}: neither the {backend} delegate nor ExecuTorch's "
        f"portable kernels implement it ({where}). Rewrite that module with supported ops "
        "(see mobile_sd.surgery) or export the component for another backend")
