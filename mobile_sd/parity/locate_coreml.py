"""Divergence locator for Core ML packages, on the MIL runtime (:mod:`mobile_sd.runtimes.coreml`).

The package runs twice with every op output recorded (``record=True``): as typed (fp16 vars
rounded to fp16) and fp32-widened. Three findings, each naming the MIL op and, where the op's
weight names carry it (``p_unet_down_blocks_0_..._weight_to_fp16_palettized``), the source
torch module of the fp32 reference with the export's surgery:

1. **fp16**: the first op whose as-typed output departs from its widened output by more than
   the gate (overflow to inf, underflow, catastrophic cancellation): a precision problem of the
   program itself, invisible in fp32.
2. **weights**: each weight tensor after its constexpr expansion (palette, affine, ...) against
   the reference parameter of the same name; palettization costs every tensor a similar SNR, so
   one far below the median (a corrupted LUT entry, a wrong palette) is named.
3. **activations**: in execution order, the first op with a known source module whose output
   falls below the gate against that module's eager output and loses at least
   ``DROP_DB`` against the previous compared op (error that appears there, not inherited).

``module`` in the result is the first of these findings in execution order.
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


def _fp16_finding(mil_typed, typed, wide, gate_db: float):
    from mobile_sd.runtimes.coreml import first_divergence

    found = first_divergence(typed, wide, mil_typed.ops(), gate_db)
    return None if found is None else {"op": found[0], "var": found[1], "cause": "fp16",
                                       "psnr_db": _psnr(typed[found[1]], wide[found[1]])}


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
    median = statistics.median(r["snr_db"] for r in rows if r["snr_db"] != float("inf")) \
        if any(r["snr_db"] != float("inf") for r in rows) else float("inf")
    worst = sorted(rows, key=lambda r: r["snr_db"])[:limit]
    outlier = next((r for r in rows if r["snr_db"] < median - OUTLIER_DB), None)
    finding = None if outlier is None else {"op": outlier["op"], "cause": "weights",
                                            "weight": outlier["name"],
                                            "snr_db": outlier["snr_db"], "median_snr_db": median}
    return worst, finding


def _psnr(test, ref) -> float:
    if not torch.isfinite(test).all():
        return float("-inf")
    return psnr_db(ref.double().numpy(), test.double().numpy())


def _activation_finding(mil_model, typed, eager: EagerModules, paths: dict, gate_db: float):
    ops = [op for op in mil_model.ops() if op.hint in paths and paths[op.hint][0] in eager.calls]
    values = eager.values([paths[op.hint][0] for op in ops])
    previous = float("inf")
    for op in ops:
        got, ref = typed.get(op.outputs[0]), values.get(paths[op.hint][0])
        if got is None or ref is None or got.numel() != ref.numel():
            continue
        value = _psnr(got.float().reshape(ref.shape), ref)
        if value < gate_db and previous - value >= DROP_DB:
            return {"op": op, "cause": "activations", "psnr_db": value,
                    "previous_psnr_db": previous}
        previous = value
    return None


def locate_mil(path, feed: dict, surgery_module: torch.nn.Module, eager_inputs,
               gate_db: float) -> dict:
    """Locate where the package at ``path`` departs, on the inputs ``feed`` (numpy by name;
    ``eager_inputs`` the same inputs for ``surgery_module``)."""
    from mobile_sd.runtimes.coreml import MilModel

    typed_model, wide_model = MilModel(path, "typed"), MilModel(path, "fp32")
    _, typed = typed_model.predict(feed, record=True)
    _, wide = wide_model.predict(feed, record=True)
    paths, params = _underscored(surgery_module)
    order = {op.name: i for i, op in enumerate(typed_model.ops())}
    worst, weights = _weight_findings(typed_model, params)
    findings = [f for f in (_fp16_finding(typed_model, typed, wide, gate_db), weights,
                            _activation_finding(typed_model, typed,
                                                EagerModules(surgery_module, eager_inputs),
                                                paths, gate_db)) if f]
    result = {"status": "found" if findings else "not_found", "engine": "mil",
              "weights_worst": [{"name": r["name"], "snr_db": round(r["snr_db"], 2),
                                 "op": r["op"].name} for r in worst]}
    if not findings:
        result["reason"] = (f"no op falls below {gate_db:g} dB with a drop of {DROP_DB:g} dB, "
                            "no fp16 divergence, no outlier weight: the error accumulates")
        return result
    first = min(findings, key=lambda f: order.get(f["op"].name, 0))
    op = first.pop("op")
    result.update({k: (round(v, 2) if isinstance(v, float) else v) for k, v in first.items()},
                  module=_label(op, paths), mil_op=op.name, op_type=op.op_type,
                  findings=[f["cause"] for f in findings])
    return result
