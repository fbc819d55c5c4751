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
  the ETRecord graph with the *reference* module's weights loaded, run node by node, each
  node's output compared with the runtime's as it is computed (never all kept: GBs at full size).
* ``devtools.intermediate_output_tap`` needs the taps inserted before lowering, i.e. a new
  export: it cannot look inside an existing artifact.

Each runtime event is matched to the reference node of its debug handles with the same output
shape (best match), in execution order; the first event below the gate is named by the deepest
module containing all its nodes, with the modules it covers.
"""
from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path

import torch

from mobile_sd.export.executorch.etrecord import is_placeholder
from mobile_sd.metrics import psnr_db


def _module_of(node) -> tuple[str, str]:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    cls = getattr(cls, "__name__", str(cls)).rsplit(".", 1)[-1]
    return path, cls


def _reference_graph(etrecord, module: torch.nn.Module) -> torch.fx.GraphModule:
    """The ETRecord's pre-partitioning graph with ``module``'s (the reference's) weights."""
    # module() shares its tensors with the ETRecord: load the reference weights into a copy.
    from mobile_sd.export.executorch.etrecord import restore_weights

    gm = copy.deepcopy(etrecord.edge_dialect_program.module())
    missing = set(module.state_dict()) - set(gm.state_dict())
    if missing:
        raise ValueError(f"the ETRecord graph lacks reference parameters such as "
                         f"{sorted(missing)[:3]}; it was not exported from this module")
    restore_weights(gm, module)   # a graph-only ETRecord holds placeholders
    gm.load_state_dict(module.state_dict(), strict=False)
    return gm


def debug_buffer_bytes(gm: torch.fx.GraphModule) -> int:
    """Room for every node's output (from the graph's shape metadata), plus a margin."""
    total = 0
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        for t in val if isinstance(val, (tuple, list)) else [val]:
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return int(total * 1.2) + (8 << 20)


@torch.no_grad()
def score_events(gm: torch.fx.GraphModule, inputs, events: list[tuple]) -> list[dict]:
    """For each runtime event: the worst, over its outputs, PSNR of the best-matching
    reference node among its debug handles (same shape), and the modules its nodes belong to.

    Streams: each reference node's output is compared when computed and then dropped, so
    memory stays at one forward pass (plus the runtime's recorded outputs).
    """
    from torch.fx.interpreter import Interpreter

    by_handle: dict[int, list[int]] = {}
    for i, (_, handles, _) in enumerate(events):
        for handle in handles:
            by_handle.setdefault(handle, []).append(i)
    best = [[None] * len(outs) for _, _, outs in events]
    modules: list[dict[str, str]] = [{} for _ in events]

    class Compare(Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            handle = node.meta.get("debug_handle")
            if (node.op != "call_function" or not isinstance(out, torch.Tensor)
                    or handle not in by_handle):
                return out
            path, cls = _module_of(node)
            for i in by_handle[handle]:
                modules[i].setdefault(path, cls)
                for j, got in enumerate(events[i][2]):
                    if tuple(got.shape) == tuple(out.shape):
                        score = psnr_db(out, got.float())
                        best[i][j] = score if best[i][j] is None else max(best[i][j], score)
            return out
    Compare(gm).run(*inputs)
    return [{"psnr_db": min((b for b in scores if b is not None), default=None),
             "modules": {k: v for k, v in mods.items() if k}} for scores, mods in zip(best, modules)]


def runtime_events(path: Path, etrecord_path: Path, inputs, buffer_bytes: int) -> list[tuple]:
    """``(event name, debug handles, outputs)`` of one run of ``path``, in execution order."""
    from executorch.devtools import Inspector

    from mobile_sd.runtimes.pte import data_file_for, load_program

    program = load_program(path, data_file_for(path), enable_etdump=True,
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


def _name(modules: list[str], classes_seen: dict[str, str], differ: list[dict],
          module) -> tuple[str, str, bool]:
    """The module to name for a departing event: a covered module whose weights differ from
    the reference if there is one (the delegate hides which op departs, the weights do not),
    else the deepest module containing all the event's nodes."""
    classes = {path: type(mod).__name__ for path, mod in module.named_modules()}
    for entry in differ:
        owner = entry["name"].rsplit(".", 1)[0]
        if owner in modules:
            return owner, classes.get(owner, ""), True
    where = _common_module(modules)
    return where, classes.get(where, classes_seen.get(where, "")), False


def locate_pte(path: Path, etrecord_path: Path | None, inputs, module, gate_db: float,
               backend: str = "xnnpack") -> dict:
    """Locate the first delegate call / kernel of ``path`` whose outputs depart from the
    reference ``module`` (fp32, with the export's surgery) on ``inputs``; inside a departing
    delegate, re-lower with taps (:mod:`mobile_sd.parity.locate_et_taps`) unless the weights
    already name the module."""
    if etrecord_path is None or not Path(etrecord_path).exists():
        return {"status": "unavailable", "reason": "the export has no ETRecord to map the "
                "program's debug handles to modules; re-export with `etrecord: true` in the recipe"}
    from executorch.devtools.etrecord import parse_etrecord

    with warnings.catch_warnings():  # devtools warns once per node it cannot describe
        warnings.simplefilter("ignore")
        etrecord = parse_etrecord(str(etrecord_path))
        differ = weights_differ(etrecord, module)
        gm = _reference_graph(etrecord, module)
        events = runtime_events(Path(path), Path(etrecord_path), inputs, debug_buffer_bytes(gm))
        scores = score_events(gm, inputs, events)
    del gm
    base = {"gate_min_psnr_db": gate_db, "weights_differ": differ,
            "method": "ETDump debug buffer + ETRecord debug handles"}
    if any(is_placeholder(t) for t in etrecord.edge_dialect_program.state_dict.values()):
        base["etrecord_note"] = ("graph-only ETRecord: the export's weights were not compared "
                                 "and re-lowering uses the reference's, so a departure caused by "
                                 "the weights themselves is not named; `etrecord: full` keeps them")
    for checked, ((name, _, _), score) in enumerate(
            ((e, s) for e, s in zip(events, scores) if s["psnr_db"] is not None), start=1):
        if score["psnr_db"] >= gate_db:
            continue
        covered = score["modules"]
        where, cls, by_weights = _name(list(covered), covered, differ, module)
        result = {"status": "found", "module": where or "<top level>", "class": cls,
                  "psnr_db": round(score["psnr_db"], 2), "checked": checked, "event": name,
                  "covers": list(covered)[:12], **base}
        if by_weights:
            result["note"] = "named by the weights that differ among the modules it covers"
        elif name == "DELEGATE_CALL" and len(covered) > 1:
            result.update(_refined(etrecord, module, where, inputs, gate_db, backend))
        return result
    return {"status": "not_found", **base,
            "reason": "no recorded delegate/kernel output falls below the gate"}


def _refined(etrecord, module, region: str, inputs, gate_db: float, backend: str) -> dict:
    """Name a module inside a departing delegate (the delegate alone is too coarse)."""
    from mobile_sd.parity.locate_tree import EagerModules
    from mobile_sd.parity.locate_et_taps import refine

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inner = refine(etrecord, EagerModules(module, inputs), region, inputs, gate_db, backend)
    except Exception as exc:  # noqa: BLE001 - keep the coarse answer, say why it stayed coarse
        return {"note": f"the departure is inside this delegate; re-lowering with taps failed "
                        f"({type(exc).__name__}: {exc})"}
    if inner is None:
        return {"note": "the departure is inside this delegate, in ops between its submodules"}
    return {"module": inner["module"], "class": inner["class"], "psnr_db": inner["psnr_db"],
            "delegate_region": region or "<top level>",
            "method": "ETDump + ETRecord, then the ETRecord program re-lowered with output taps"}


def weights_differ(etrecord, module, limit: int = 5) -> list[dict]:
    """Parameters whose value in the ETRecord (the weights the export saw) differs from the
    reference module's."""
    state, ref = etrecord.edge_dialect_program.state_dict, module.state_dict()
    found = []
    for name, tensor in state.items():
        if is_placeholder(tensor):     # graph-only ETRecord: the export's weights are not in it
            continue
        if name in ref and ref[name].shape == tensor.shape and tensor.is_floating_point():
            diff = float((tensor.detach().double() - ref[name].detach().double()).abs().max()
                         if tensor.numel() else 0.0)
            if diff > 0:
                found.append({"name": name, "max_abs": diff})
    return sorted(found, key=lambda d: -d["max_abs"])[:limit]


__all__ = ["locate_pte", "score_events", "runtime_events", "weights_differ", "debug_buffer_bytes"]
