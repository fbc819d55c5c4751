"""ExecuTorch side of the divergence locator: ETDump intermediate outputs + ETRecord.

Checked on executorch 1.5.1 / XNNPACK:

* Running a ``.pte`` with ``enable_etdump=True`` and a debug buffer records the outputs of every
  delegate call (one XNNPACK partition) and every portable kernel, each with the debug handles
  of the graph nodes it covers. Inside a delegate nothing finer is visible.
* The ETRecord written at export (``generate_etrecord=True``) keeps the edge-dialect program
  before partitioning, whose nodes carry those debug handles and their ``nn_module_stack``.
* ``Inspector.calculate_numeric_gap`` compares the runtime with the ETRecord's *own* graph and
  weights, so it cannot see an export made from the wrong weights, and it fails on delegates
  whose outputs do not line up with single nodes. So the reference values are computed here:
  the ETRecord graph with the *reference* module's weights loaded, run node by node.
* ``devtools.intermediate_output_tap`` needs the taps inserted before lowering, i.e. a new
  export: it cannot look inside an existing artifact.

Each runtime event is matched to the reference node of its debug handles with the same output
shape (best match), in execution order; the first event below the gate is named by the deepest
module containing all its nodes, with the modules it covers.
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from mobile_sd.parity.metrics import psnr_db


def _module_of(node) -> tuple[str, str]:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    cls = getattr(cls, "__name__", str(cls)).rsplit(".", 1)[-1]
    return path, cls


@torch.no_grad()
def reference_values(etrecord, module: torch.nn.Module, inputs) -> dict[int, tuple]:
    """``debug handle -> (tensor, node name, module path, class)`` of the ETRecord graph run
    with ``module``'s weights (the reference), not the weights stored with the export."""
    from torch.fx.interpreter import Interpreter

    # module() shares its tensors with the ETRecord: load the reference weights into a copy.
    gm = copy.deepcopy(etrecord.edge_dialect_program.module())
    missing = set(module.state_dict()) - set(gm.state_dict())
    if missing:
        raise ValueError(f"the ETRecord graph lacks reference parameters such as "
                         f"{sorted(missing)[:3]}; it was not exported from this module")
    gm.load_state_dict(module.state_dict(), strict=False)
    values: dict[int, tuple] = {}

    class Capture(Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            handle = node.meta.get("debug_handle")
            if node.op == "call_function" and isinstance(handle, int) and isinstance(out, torch.Tensor):
                values[handle] = (out.detach().clone(), node.name, *_module_of(node))
            return out
    Capture(gm).run(*inputs)
    return values


def runtime_events(path: Path, etrecord_path: Path, inputs, buffer_bytes: int) -> list[tuple]:
    """``(event name, debug handles, outputs)`` of one run of ``path``, in execution order."""
    from executorch.devtools import Inspector
    from executorch.runtime import Runtime

    from mobile_sd.exporters.et_runtime import data_file_for

    program = Runtime.get().load_program(path, data_path=data_file_for(path), enable_etdump=True,
                                         debug_buffer_size=buffer_bytes)
    program.load_method("forward").execute([t.contiguous() for t in inputs])
    with tempfile.TemporaryDirectory(prefix="msd-etdump-") as tmp:
        etdump, debug = Path(tmp) / "run.etdp", Path(tmp) / "debug.bin"
        program.write_etdump_result_to_file(str(etdump), str(debug))
        inspector = Inspector(etdump_path=str(etdump), etrecord=str(etrecord_path),
                              debug_buffer_path=str(debug))
    events = []
    for block in inspector.event_blocks:
        for event in block.events:
            if event.name == "OPERATOR_CALL" or not event.debug_data or event.debug_handles is None:
                continue
            handles = event.debug_handles
            handles = (handles,) if isinstance(handles, int) else tuple(handles)
            data = list(event.debug_data)
            # A delegate call logs its arguments: inputs first, then its outputs.
            n_out = getattr(event, "num_outputs", None) or len(data)
            outs = [d for d in data[-n_out:] if isinstance(d, torch.Tensor)]
            events.append((event.name, handles, outs))
    return events


def _common_module(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths if p]
    if not parts:
        return ""
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


def _score(outs, nodes) -> float:
    """Worst over the event's outputs of the best-matching reference node (same shape)."""
    worst = float("inf")
    for out in outs:
        matches = [psnr_db(ref, out.float()) for ref, *_ in nodes if tuple(ref.shape) == tuple(out.shape)]
        if matches:
            worst = min(worst, max(matches))
    return worst


def _name(modules: list[str], nodes, differ: list[dict], module) -> tuple[str, str]:
    """The module to name for a departing event: a covered module whose weights differ from
    the reference if there is one (the delegate hides which op departs, the weights do not),
    else the deepest module containing all the event's nodes."""
    classes = {path: type(mod).__name__ for path, mod in module.named_modules()}
    for entry in differ:
        owner = entry["name"].rsplit(".", 1)[0]
        if owner in modules:
            return owner, classes.get(owner, "")
    where = _common_module(modules)
    return where, classes.get(where, next((n[3] for n in nodes if n[2] == where), ""))


def locate_pte(path: Path, etrecord_path: Path | None, inputs, module, gate_db: float) -> dict:
    """Locate the first delegate call / kernel of ``path`` whose outputs depart from the
    reference ``module`` (fp32, with the export's surgery) on ``inputs``."""
    if etrecord_path is None or not Path(etrecord_path).exists():
        return {"status": "unavailable", "reason": "the export has no ETRecord to map the "
                "program's debug handles to modules; re-export with `etrecord: true` in the recipe"}
    from executorch.devtools.etrecord import parse_etrecord

    etrecord = parse_etrecord(str(etrecord_path))
    differ = weights_differ(etrecord, module)  # before the reference weights are loaded into it
    reference = reference_values(etrecord, module, inputs)
    buffer = int(sum(t.numel() * t.element_size() for t, *_ in reference.values()) * 1.2) + (8 << 20)
    checked = 0
    for name, handles, outs in runtime_events(Path(path), Path(etrecord_path), inputs, buffer):
        nodes = [reference[h] for h in handles if h in reference]
        score = _score(outs, nodes)
        if score == float("inf"):
            continue
        checked += 1
        if score < gate_db:
            modules = list(dict.fromkeys(n[2] for n in nodes if n[2]))
            where, cls = _name(modules, nodes, differ, module)
            return {"status": "found", "module": where or "<top level>", "class": cls,
                    "psnr_db": round(score, 2), "gate_min_psnr_db": gate_db, "checked": checked,
                    "event": name, "covers": modules[:12],
                    "weights_differ": differ, "method": "ETDump debug buffer + ETRecord debug handles",
                    "note": ("a delegate call is the finest unit ETDump records; the departure "
                             "is inside the modules it covers") if name == "DELEGATE_CALL" else None}
    return {"status": "not_found", "gate_min_psnr_db": gate_db, "checked": checked,
            "weights_differ": differ, "method": "ETDump debug buffer + ETRecord debug handles",
            "reason": "no recorded delegate/kernel output falls below the gate"}


def weights_differ(etrecord, module, limit: int = 5) -> list[dict]:
    """Parameters whose value in the ETRecord (the weights the export saw) differs from the
    reference module's."""
    state, ref = etrecord.edge_dialect_program.state_dict, module.state_dict()
    found = []
    for name, tensor in state.items():
        if name in ref and ref[name].shape == tensor.shape and tensor.is_floating_point():
            diff = float((tensor.double() - ref[name].double()).abs().max()) if tensor.numel() else 0.0
            if diff > 0:
                found.append({"name": name, "max_abs": diff})
    return sorted(found, key=lambda d: -d["max_abs"])[:limit]


__all__ = ["locate_pte", "reference_values", "runtime_events", "weights_differ"]
