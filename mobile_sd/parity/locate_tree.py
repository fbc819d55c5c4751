"""The eager side of every locator: module outputs captured with hooks, and the descent of
the module tree that stops at the first child below the gate (shared by the ONNX and
ExecuTorch locators, :mod:`mobile_sd.parity.locate`)."""
from __future__ import annotations

from collections import OrderedDict

import torch

from mobile_sd.metrics import psnr_db


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
