"""Look inside an XNNPACK delegate: re-lower the export's own program with output taps.

ETDump sees a delegate call as one unit, and with mobile-sd's XNNPACK surgery a whole UNet
is often a single delegate. The ETRecord keeps the ATen program the export lowered (with the
export's weights); ``executorch.devtools.intermediate_output_tap`` (new in 1.5) adds chosen
module outputs as extra program outputs that survive partitioning. Lowering that program again
with the same partitioner and running it yields the artifact's values *inside* the delegate,
which are compared with the reference module's (eager hooks).

Two lowerings at most, to bound the cost at full size (one lowering of the SD UNet takes
minutes): the direct submodules of the departing region first, then every leaf module inside
the first submodule that departs.
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from mobile_sd.parity.locate_tree import direct_children
from mobile_sd.metrics import psnr_db


def _program(etrecord, module: torch.nn.Module):
    """A copy of the ETRecord's ATen program, with the non-persistent buffers it lost.

    ETRecord does not serialize non-persistent buffers (e.g. the ``_nearest_kernel`` of the
    ``xnnpack_upsample`` pass), and the program cannot be lowered without them; they are
    constants of the architecture, so the reference module's are the export's.
    """
    from torch.export.graph_signature import InputKind

    from mobile_sd.export.executorch.etrecord import restore_weights

    program = copy.deepcopy(etrecord.exported_program)
    restore_weights(program, module)   # a graph-only ETRecord holds placeholders
    buffers = dict(module.named_buffers())
    for spec in program.graph_signature.input_specs:
        if (spec.kind == InputKind.BUFFER and spec.persistent is False
                and spec.target not in program.constants and spec.target in buffers):
            program.constants[spec.target] = buffers[spec.target]
    return program


def tapped_values(etrecord, module, paths: list[str], inputs, shapes: dict[str, tuple],
                  backend: str) -> dict[str, torch.Tensor]:
    """The runtime values of the outputs of modules ``paths`` in the ETRecord's program,
    lowered again for ``backend`` with those outputs tapped."""
    from executorch.devtools.intermediate_output_tap import (select_by_module_path,
                                                             strip_taps_,
                                                             tap_intermediate_outputs_)
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    ends = select_by_module_path(*paths, output_only=True)
    # A module may also end in ops that return no tensor (asserts): those cannot be tapped.
    selector = lambda n: ends(n) and isinstance(n.meta.get("val"), torch.Tensor)  # noqa: E731
    program, specs = tap_intermediate_outputs_(_program(etrecord, module),
                                               rules=[(selector, "FULL_TENSOR")],
                                               error_on_empty=False)
    if not specs:
        return {}
    owners = _owners(program, specs, paths)
    edge = to_edge_transform_and_lower(program, partitioner=_partitioners(backend))
    strip_taps_(edge)
    with tempfile.TemporaryDirectory(prefix="msd-taps-") as tmp:
        path = Path(tmp) / "tapped.pte"
        edge.to_executorch().save(str(path))
        outputs = Runtime.get().load_program(path).load_method("forward").execute(
            [t.contiguous() for t in inputs])
    values: dict[str, torch.Tensor] = {}
    for spec in specs:  # a module may end in several nodes: keep the one shaped like its output
        out, owner = outputs[spec.output_index], owners.get(spec.node_name)
        if owner in shapes and tuple(out.shape) == tuple(shapes[owner]):
            values[owner] = out.clone()
    return values


def _owners(program, specs, paths: list[str]) -> dict[str, str]:
    """Tapped node name -> the requested module it ends. A TapSpec names the innermost module
    of its node, not the (outer) module whose output it is; the requested paths are disjoint
    (siblings or leaves), so the one in the node's module stack is the owner."""
    nodes = {n.name: n for n in program.graph.nodes}
    wanted, owners = set(paths), {}
    for spec in specs:
        node = nodes.get(spec.node_name)
        stack = (node.meta.get("nn_module_stack") or {}).values() if node is not None else ()
        owner = next((entry[0] for entry in stack if entry[0] in wanted), None)
        if owner is not None:
            owners[spec.node_name] = owner
    return owners


def _partitioners(backend: str) -> list:
    if backend != "xnnpack":
        raise ValueError(f"re-lowering with taps supports xnnpack programs, not {backend!r}")
    from mobile_sd.export.executorch.backends import xnnpack_partitioners

    return xnnpack_partitioners()


def _first_below(paths, reference, values, gate_db: float):
    for path in paths:
        if path in values and path in reference:
            score = psnr_db(reference[path], values[path])
            if score < gate_db:
                return path, score
    return None


def refine(etrecord, eager, region: str, inputs, gate_db: float, backend: str) -> dict | None:
    """The first module inside ``region`` (a module path, '' for the root) whose tapped value
    departs from the reference; None when no submodule output falls below the gate.

    ``eager``: :class:`~mobile_sd.parity.locate.EagerModules` of the reference on ``inputs``.
    Stage 1 taps the region's direct submodules; stage 2 every leaf module inside the first
    that departs. XNNPACK rejects some tap sets ("pass through arguments"): stage 2 then taps
    that submodule's direct children instead, and the answer is one level coarser.
    """
    paths = list(eager.calls)
    shapes = {p: shape for p, (_, shape) in eager.calls.items()}

    def first(candidates):
        values = tapped_values(etrecord, eager.module, candidates, inputs, shapes, backend)
        return _first_below(candidates, eager.values(list(values)), values, gate_db)

    found = first(direct_children(region, paths))
    if found is None:
        return None
    block, note = found[0], None
    leaves = [p for p in paths if p.startswith(block + ".")
              and not any(q.startswith(p + ".") for q in paths)]
    if leaves:
        try:
            found = first(leaves) or found
        except RuntimeError as exc:  # XNNPACK cannot take this tap set
            note = f"leaf taps failed to lower ({str(exc).splitlines()[0][:120]}); one level up"
            found = first(direct_children(block, paths)) or found
    return {"module": found[0], "class": eager.calls[found[0]][0], "psnr_db": round(found[1], 2),
            "block": block, "tap_note": note}
