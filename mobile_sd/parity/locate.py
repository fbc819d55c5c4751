"""Divergence locator: the first module where an artifact's values depart from the reference.

Reference values are module outputs of the fp32 module *with the export's surgery* (same
module names as the exported graph), captured with forward hooks. On the artifact side:

* **ONNX** (:func:`locate_onnx`): the dynamo exporter tags every node with its module scopes
  (``pkg.torch.onnx.name_scopes`` metadata). A module's value is the last node output inside its
  scope with the module output's shape; those values are exposed as extra graph outputs and run
  in onnxruntime. The search descends the module tree: at each level the children's values are
  compared in execution order and the search enters the first child whose PSNR falls below the
  gate, so a full-size UNet needs one session per tree level, not thousands of outputs.
  Initializers are also compared by name with the reference weights (``weights_differ``).
* **ExecuTorch** (:func:`mobile_sd.parity.locate_et.locate_pte`): the program runs with an
  ETDump debug buffer, which records every delegate call's and portable kernel's outputs with
  their debug handles; the ETRecord written at export maps handles to graph nodes and modules.
  Inside a departing delegate (a whole UNet can be one), the ETRecord's program is lowered
  again with module outputs tapped (:mod:`mobile_sd.parity.locate_et_taps`), unless weights
  that differ from the reference already name the module.

The result names the module path and class, e.g. ``down_blocks.1.resnets.0.conv1 (Conv2d)``.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from mobile_sd.parity.metrics import psnr_db


def first_tensor(out) -> torch.Tensor | None:
    """The primary tensor of a module output (tensor, tuple, or a diffusers/transformers output)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample") and isinstance(out.sample, torch.Tensor):
        return out.sample
    if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple"):
        items = out.to_tuple() if hasattr(out, "to_tuple") else out
        return next((t for t in items if isinstance(t, torch.Tensor)), None)
    return None


class EagerModules:
    """The reference module's submodules called exactly once per forward, in the order their
    calls finish (``calls``: path -> (class name, output shape)), and their outputs on demand.

    Outputs are captured per request (one forward pass per tree level) instead of all at once:
    every module output of a full-size UNet would take several GB. Modules called several
    times (shared activations) are left out: their output is ambiguous and their parents
    cover them.
    """

    def __init__(self, module: torch.nn.Module, inputs) -> None:
        self.module, self.inputs = module, tuple(inputs)
        seen: dict[str, list] = {}
        self._run(None, lambda path, mod, t: seen.setdefault(path, []).append(
            (type(mod).__name__, tuple(t.shape))))
        self.calls = OrderedDict((p, c[0]) for p, c in seen.items() if len(c) == 1)

    def values(self, paths) -> dict[str, torch.Tensor]:
        """Outputs (fp32 copies) of the modules ``paths`` on the inputs."""
        out: dict[str, torch.Tensor] = {}
        self._run(set(paths), lambda path, mod, t: out.__setitem__(path, t.detach().float().clone()))
        return out

    @torch.no_grad()
    def _run(self, only, record) -> None:
        handles = []
        for path, sub in self.module.named_modules():
            if path and (only is None or path in only):
                def hook(mod, args, output, path=path):
                    tensor = first_tensor(output)
                    if tensor is not None:
                        record(path, mod, tensor)
                handles.append(sub.register_forward_hook(hook))
        try:
            self.module(*self.inputs)
        finally:
            for handle in handles:
                handle.remove()


def direct_children(parent: str, paths) -> list[str]:
    """Captured modules directly below ``parent`` ('' is the root). Module names contain dots
    (``down_blocks.0``), so "direct" means no other captured module lies in between."""
    prefix = f"{parent}." if parent else ""
    below = [p for p in paths if p.startswith(prefix) and p != parent]
    return [p for p in below if not any(q != p and p.startswith(q + ".") for q in below)]


def descend(calls: "OrderedDict[str, tuple[str, tuple]]", reference, evaluate,
            gate_db: float) -> dict:
    """Walk down the module tree to the first module whose value falls below ``gate_db``.

    ``calls``: module path -> (class, shape) in execution order (:class:`EagerModules`);
    ``reference(paths)`` / ``evaluate(paths)`` -> ``{path: tensor/array}``: the eager and the
    artifact's values of some modules (the artifact leaves out modules it cannot match). At
    each level the first child, in execution order, below the gate is entered; the module
    reached is the one named.
    """
    paths = list(calls)
    parent, score, trail, checked, own_ops = "", None, [], 0, False
    while True:
        kids = direct_children(parent, paths)
        if not kids:
            break
        values = evaluate(kids)
        expected = reference([k for k in kids if k in values])
        checked += len(values)
        scores = [(p, psnr_db(expected[p], values[p])) for p in kids if p in values and p in expected]
        bad = next(((p, s) for p, s in scores if s < gate_db), None)
        if bad is None:
            own_ops = bool(scores)
            break
        trail.append({"module": bad[0], "psnr_db": round(bad[1], 2)})
        parent, score = bad
    if not parent:
        return {"status": "not_found", "gate_min_psnr_db": gate_db, "checked": checked,
                "reason": "no module output falls below the gate: the error builds up across "
                          "modules instead of starting in one"}
    return {"status": "found", "module": parent, "class": calls[parent][0],
            "psnr_db": round(score, 2), "gate_min_psnr_db": gate_db, "checked": checked,
            "trail": trail, "note": ("its submodules stay above the gate: the departure is in "
                                     "this module's own ops") if own_ops else None}


def locate(folder, manifest: dict, name: str, runner, surgery, sample, gate_db: float) -> dict:
    """Locate where component ``name`` departs from the reference on ``sample``'s inputs.

    ``surgery``: the fp32 :class:`ExportComponent` with the export's surgery (see
    :func:`mobile_sd.parity.eager.surgery_component`). Never raises for a locator failure: a
    diagnostic that cannot run reports why, and the parity verdict stands.
    """
    if len(runner.files) > 1:
        return {"status": "unavailable", "reason": "chunked component: locate within one chunk "
                "is not supported; compare the chunks' outputs in the report"}
    path = Path(runner.files[0].path)
    try:
        if runner.runtime == "onnxruntime":
            from mobile_sd.parity.locate_onnx import locate_onnx

            eager = EagerModules(surgery.module, sample.inputs)
            result = locate_onnx(path, runner.files[0].inputs, sample.inputs, eager, gate_db)
            result["weights_differ"] = _weights_differ(path, surgery.module)
        elif runner.runtime == "executorch":
            from mobile_sd.parity.locate_et import locate_pte

            result = locate_pte(path, _etrecord_for(folder, manifest, name), sample.inputs,
                                surgery.module, gate_db, getattr(runner.files[0], "backend", ""))
        else:
            return {"status": "unavailable", "reason": f"no locator for {runner.runtime}"}
    except Exception as exc:  # noqa: BLE001 - a diagnostic must not hide the verdict
        return {"status": "error", "reason": f"locator failed: {type(exc).__name__}: {exc}"}
    result["sample"] = sample.label
    return result


def _etrecord_for(folder, manifest: dict, name: str) -> Path | None:
    for entry in manifest["components"][name].get("files", []):
        if entry.get("format") == "etrecord" or str(entry.get("path", "")).endswith(".etrecord"):
            return Path(folder) / entry["path"]
    return None


def _weights_differ(path: Path, module: torch.nn.Module, limit: int = 5) -> list[dict]:
    """Initializers whose name is a reference parameter and whose value differs from it."""
    from mobile_sd.parity.locate_onnx import initializers

    state = module.state_dict()
    found = []
    for name, array in initializers(path, set(state)):
        ref = state[name].detach().numpy().astype(array.dtype)
        if array.shape == ref.shape and not np.array_equal(array, ref):
            diff = float(np.max(np.abs(array.astype(np.float64) - ref.astype(np.float64))))
            found.append({"name": name, "max_abs": diff})
    return sorted(found, key=lambda d: -d["max_abs"])[:limit]
