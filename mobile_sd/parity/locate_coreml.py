"""Divergence locator for Core ML packages, on the MIL runtime (:mod:`mobile_sd.runtimes.coreml`).

The package runs twice with every op output recorded (``record=True``): as typed (fp16 vars
rounded to fp16) and fp32-widened. Three findings, each naming the MIL op and, where the op's
weight names carry it (``p_unet_down_blocks_0_..._weight_to_fp16_palettized``), the source
torch module of the fp32 reference with the export's surgery:

1. **fp16 overflow**: the first op whose as-typed output is inf/nan where the widened one is
   finite: a precision problem of the program itself, invisible in fp32.
2. **weights**: each weight tensor after its constexpr expansion (palette, affine, ...) against
   the reference parameter of the same name; palettization costs every palettized tensor a
   similar SNR, so one ``OUTLIER_DB`` below the median of its kind (palettized or not) is named
   (a corrupted LUT entry, a wrong palette).
3. **activations**: in execution order, the first op with a known source module whose output
   falls below the gate against that module's eager output and loses at least
   ``DROP_DB`` against the previous compared op (error that appears there, not inherited).

``module`` in the result is the most specific finding (overflow, then weights, then
activations); ``findings`` lists all of them.
"""
from __future__ import annotations

import re
import statistics

import torch

from mobile_sd.metrics import psnr_db, sqnr_db
from mobile_sd.parity.locate_tree import EagerModules

DROP_DB = 10.0          # an activation finding must lose this much against the op before it
OUTLIER_DB = 15.0       # a weight finding is this far below the median weight SNR
_PARAM = re.compile(r"^p_(.*?)(_to_fp16|_to_fp32)?(_palettized|_quantized|_sparsified)*$")


def _snr_db(test: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(test).all():
        return float("-inf")
    return sqnr_db(ref.double().numpy(), test.double().numpy())


def _underscored(module: torch.nn.Module) -> tuple[dict, dict]:
    """Reference module paths and parameters keyed as MIL names spell them (dots -> '_')."""
    paths = {name.replace(".", "_"): (name, type(m).__name__) for name, m in module.named_modules()}
    params = {name.replace(".", "_"): p.detach() for name, p in module.named_parameters()}
    return paths, params


def _label(op, paths: dict) -> str:
    path, cls = paths.get(op.hint, (op.hint, "")) if op.hint else ("", "")
    where = f"{path} ({cls}) " if path else ""
    return f"{where}at MIL op {op.name} [{op.op_type}]"


def _fp16_finding(mil_typed, typed, wide):
    """The first op whose as-typed output is inf/nan where the widened one is finite: fp16
    overflow in the program itself. (Plain fp16 rounding is not a finding: it departs
    everywhere by design, e.g. sin/cos of large timestep arguments.)"""
    for op in mil_typed.ops():
        for name in op.outputs:
            a, b = typed.get(name), wide.get(name)
            if isinstance(a, torch.Tensor) and a.is_floating_point() and b is not None \
                    and not torch.isfinite(a).all() and torch.isfinite(b).all():
                return {"op": op, "var": name, "cause": "fp16 overflow"}
    return None


def _weight_findings(mil_model, params: dict, limit: int = 5) -> tuple[list, dict | None]:
    """(worst weights, the outlier finding or None)."""
    consts, rows = mil_model._prepared.consts, []
    first_use = {}
    for op in mil_model.ops():
        for w in op.weights:
            first_use.setdefault(w, op)
    for name, op in first_use.items():
        match = _PARAM.match(name)
        ref = params.get(match.group(1)) if match else None
        value = consts.get(name)
        if ref is None or not isinstance(value, torch.Tensor) or value.numel() != ref.numel():
            continue
        rows.append({"name": name, "op": op, "snr_db": _snr_db(value.float().reshape(ref.shape),
                                                               ref.float())})
    if not rows:
        return [], None
    worst = sorted(rows, key=lambda r: r["snr_db"])[:limit]
    outliers = []
    for palettized in (True, False):   # palettes cost far more SNR than fp16 rounding
        group = [r for r in rows if r["name"].endswith("_palettized") == palettized]
        if len(group) >= 3:
            median = statistics.median(r["snr_db"] for r in group)
            outliers += [dict(r, median_snr_db=median) for r in group
                         if r["snr_db"] < median - OUTLIER_DB]
    if not outliers:
        return worst, None
    bad = min(outliers, key=lambda r: r["snr_db"])
    return worst, {"op": bad["op"], "cause": "weights", "weight": bad["name"],
                   "snr_db": bad["snr_db"], "median_snr_db": bad["median_snr_db"]}


def _psnr(test, ref) -> float:
    if not torch.isfinite(test).all():
        return float("-inf")
    return psnr_db(ref.double().numpy(), test.double().numpy())


def _activation_finding(mil_model, typed, eager: EagerModules, paths: dict, gate_db: float):
    ops = [op for op in mil_model.ops() if op.hint in paths and paths[op.hint][0] in eager.calls]
    values = eager.values([paths[op.hint][0] for op in ops])
    previous = float("inf")
    for op in ops:
        got = _aligned(typed.get(op.outputs[0]), values.get(paths[op.hint][0]))
        if got is None:
            continue
        ref = values[paths[op.hint][0]]
        value = _psnr(got, ref)
        if value < gate_db and previous - value >= DROP_DB:
            return {"op": op, "cause": "activations", "psnr_db": value,
                    "previous_psnr_db": previous}
        previous = value
    return None


def _aligned(got, ref):
    """``got`` in ``ref``'s shape when both hold the same layout (equal shapes up to size-1
    dims), else None. A fused MIL op (coremltools' layer_norm fusion on ``(B, C, 1, S)``) can
    output a transposed layout with the same element count: reshaping that would compare
    scrambled values and name a healthy op."""
    if got is None or ref is None:
        return None
    if [d for d in got.shape if d != 1] != [d for d in ref.shape if d != 1]:
        return None
    return got.float().reshape(ref.shape)


def locate_mil(path, feed: dict, surgery_module: torch.nn.Module, eager_inputs,
               gate_db: float) -> dict:
    """Locate where the package at ``path`` departs, on the inputs ``feed`` (numpy by name;
    ``eager_inputs`` the same inputs for ``surgery_module``)."""
    from mobile_sd.runtimes.coreml import MilModel

    typed_model, wide_model = MilModel(path, "typed"), MilModel(path, "fp32")
    _, typed = typed_model.predict(feed, record=True)
    _, wide = wide_model.predict(feed, record=True)
    paths, params = _underscored(surgery_module)
    worst, weights = _weight_findings(typed_model, params)
    eager = EagerModules(surgery_module, eager_inputs)
    findings = [f for f in (_fp16_finding(typed_model, typed, wide), weights,
                            _activation_finding(typed_model, typed, eager, paths, gate_db)) if f]
    result = {"status": "found" if findings else "not_found", "engine": "mil",
              "weights_worst": [{"name": r["name"], "snr_db": round(r["snr_db"], 2),
                                 "op": r["op"].name} for r in worst]}
    if not findings:
        result["reason"] = (f"no op falls below {gate_db:g} dB with a drop of {DROP_DB:g} dB, "
                            "no fp16 divergence, no outlier weight: the error accumulates")
        return result
    first = findings[0]            # by cause: overflow, then a bad weight, then activations
    result.update({k: (round(v, 2) if isinstance(v, float) else v) for k, v in first.items()
                   if k != "op"}, module=_label(first["op"], paths), mil_op=first["op"].name,
                  op_type=first["op"].op_type,
                  findings=[{"cause": f["cause"], "module": _label(f["op"], paths)}
                            for f in findings])
    return result
