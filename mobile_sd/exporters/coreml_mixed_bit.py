"""Mixed-bit palettization: bits per weight from measured sensitivity, to hit a size target.

Measured in torch (fp32) on the component's **recorded reference inputs** (the pipeline run of
``mobile-sd export``), since Core ML cannot run here:

1. Candidates: the ``max_layers`` largest weights that the recipe palettizes.
2. Sensitivity: for each candidate and each of ``candidate_bits``, palettize only that weight
   (the fast k-means of :mod:`mobile_sd.compress`, the recipe's granularity and mode), run the
   component and record the output MSE against the unmodified component.
3. Selection: start every candidate at the highest bits; repeatedly lower the bits of the
   weight whose step adds the least predicted MSE per byte saved (errors of different layers
   add up: their MSEs are summed), until the estimated size is at most ``target_size_mb``.
   Every step is a point of the PSNR-vs-size curve.
4. Check: the chosen plan, and a few curve points, are measured with all those weights
   palettized together (``measured_psnr_db`` next to ``predicted_psnr_db``).

Writes ``mixed_bit_curve.json`` (the data) and ``mixed_bit_curve.png`` (rendered from it).
PSNR is Apple's: ``20 log10(max|ref| / rmse)``.

Cost: ``max_layers x len(candidate_bits)`` forward passes of the component; seconds on tiny
specs, but ~20 s each for the full-size UNet at 64x64 on 2 cores (192 passes: about an hour).

>>> plan, summary = plan_mixed_bit(comp, config, recipe.mixed_bit, reference, out_dir)  # doctest: +SKIP
>>> summary["chosen"]["size_mb"] <= recipe.mixed_bit.target_size_mb                    # doctest: +SKIP
True
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch

from mobile_sd.compress.config import CompressionConfig, PalettizeSpec
from mobile_sd.compress.recipe import palettization
from mobile_sd.errors import CalibrationError, InvalidArgumentError, RecipeError

CURVE_JSON = "mixed_bit_curve.json"
CURVE_PNG = "mixed_bit_curve.png"
CHECKED_POINTS = 4   # curve points measured jointly besides the chosen one


@dataclasses.dataclass(frozen=True)
class Weight:
    name: str          # torch parameter path, e.g. "unet.down_blocks.1.attentions.0.proj_in.weight"
    numel: int
    channels: int


def plan_mixed_bit(comp, config: CompressionConfig, mixed, reference, out_dir: Path):
    """``({parameter name: nbits}, summary)``; writes the curve JSON and PNG into ``out_dir``."""
    base = palettization(config)
    if base is None:
        raise RecipeError("mixed_bit needs a palettization compression.global_ spec")
    module = comp.module.eval()
    inputs = _reference_inputs(comp, reference)
    weights = palettized_weights(module, config)
    candidates = sorted(weights, key=lambda w: -w.numel)[:mixed.max_layers]
    if not candidates:
        raise RecipeError(f"mixed_bit: the {comp.name} has no weight the compression config "
                          "palettizes (all below weight_threshold or set to null)")
    params = dict(module.named_parameters())
    ref = _run(module, inputs)
    bits = sorted(mixed.candidate_bits, reverse=True)
    mse = {(w.name, b): _mse(ref, _run_palettized(module, params, {w.name: b}, base, inputs))
           for w in candidates for b in bits}
    fixed_mb = _fixed_mb(module, weights, candidates, base)
    curve = _greedy_curve(candidates, bits, mse, fixed_mb, _peak(ref))
    chosen = next((p for p in curve if p["size_mb"] <= mixed.target_size_mb), curve[-1])
    _measure_points(curve, chosen, module, params, base, inputs, ref)
    summary = {"target_size_mb": mixed.target_size_mb, "candidate_bits": bits,
               "layers_measured": len(candidates), "base_nbits": base.nbits,
               "reference_call": 0, "chosen": _public(chosen), "met_target":
               chosen["size_mb"] <= mixed.target_size_mb}
    _write_curve(Path(out_dir), summary, curve)
    summary.update(curve=CURVE_JSON, plot=CURVE_PNG)
    return dict(chosen["bits"]), summary


def _reference_inputs(comp, reference) -> tuple:
    calls = reference.calls(comp.name) if reference is not None else []
    if not calls:
        raise CalibrationError(f"mixed_bit: no recorded {comp.name} call to measure "
                               "sensitivity on; the reference pipeline run recorded none")
    inputs, _ = comp.from_call(calls[0])
    return inputs


def palettized_weights(module: torch.nn.Module, config: CompressionConfig) -> list[Weight]:
    """Conv / linear weights above ``weight_threshold`` that ``config`` palettizes."""
    found = []
    for mod_name, mod in module.named_modules():
        op_type = _op_type(mod)
        weight = getattr(mod, "weight", None)
        if op_type is None or weight is None or weight.numel() <= config.weight_threshold:
            continue
        name = f"{mod_name}.weight" if mod_name else "weight"
        pinned = [n for n in (mil_weight_name(name, True), mil_weight_name(name))
                  if n in config.op_name]
        spec = config.resolve(pinned[0] if pinned else name, op_type)
        if isinstance(spec, PalettizeSpec):
            found.append(Weight(name, weight.numel(), weight.shape[0]))
    return found


def _op_type(mod: torch.nn.Module) -> str | None:
    if isinstance(mod, (torch.nn.Conv1d, torch.nn.Conv2d)):
        return "conv"
    if isinstance(mod, torch.nn.ConvTranspose2d):
        return "conv_transpose"
    if isinstance(mod, torch.nn.Linear):
        return "linear"
    return None


def mil_weight_name(param: str, fp16: bool = False) -> str:
    """The const name torch.export + coremltools give a parameter (``_to_fp16`` when cast).

    >>> mil_weight_name("unet.conv_in.weight", fp16=True)
    'p_unet_conv_in_weight_to_fp16'
    """
    return "p_" + param.replace(".", "_") + ("_to_fp16" if fp16 else "")


def apply_plan(config: CompressionConfig, plan: dict[str, int],
               weight_names: set[str]) -> CompressionConfig:
    """``config`` with an ``op_name`` spec per planned weight (names as in the program).

    Entries the recipe set by op name win over the plan (the user pinned them).
    """
    base = palettization(config)
    planned = {}
    for param, nbits in plan.items():
        name = next((n for n in (mil_weight_name(param, True), mil_weight_name(param))
                     if n in weight_names), None)
        if name is None:
            raise InvalidArgumentError(f"mixed_bit: weight {param!r} has no const in the "
                                       "converted program; this is a bug, please report it")
        planned[name] = dataclasses.replace(base, nbits=nbits)
    return dataclasses.replace(config, op_name={**planned, **dict(config.op_name)})


# --- measurement ------------------------------------------------------------------------------

def _run(module, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = module(*inputs)
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out.detach().float()


def _run_palettized(module, params, bits: dict[str, int], base: PalettizeSpec, inputs):
    saved = {name: params[name].detach().clone() for name in bits}
    try:
        with torch.no_grad():
            for name, nbits in bits.items():
                params[name].copy_(torch.from_numpy(_palettized(saved[name], nbits, base)))
        return _run(module, inputs)
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


def _palettized(weight: torch.Tensor, nbits: int, base: PalettizeSpec) -> np.ndarray:
    from mobile_sd.compress.palettize import palettize_tensor

    try:
        p = palettize_tensor(weight, nbits, base.granularity, base.group_size, base.mode)
    except InvalidArgumentError:  # group_size does not divide this weight's channels
        p = palettize_tensor(weight, nbits, "per_tensor", mode=base.mode)
    return np.ascontiguousarray(p.dequantized())


def _mse(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(((ref.double() - out.double()) ** 2).mean())


def _peak(ref: torch.Tensor) -> float:
    return float(ref.abs().max())


def _psnr(peak: float, mse: float) -> float:
    return float("inf") if mse <= 0 else 20 * math.log10(peak / math.sqrt(mse))


# --- selection --------------------------------------------------------------------------------

def _lut_mb(w: Weight, nbits: int, base: PalettizeSpec) -> float:
    """Packed indices plus fp16 LUTs (one per channel group when grouped)."""
    groups = w.channels // base.group_size if base.granularity == "per_grouped_channel" else 1
    return (math.ceil(w.numel * nbits / 8) + max(groups, 1) * 2 ** nbits * 2) / 1e6


def _fixed_mb(module, weights, candidates, base: PalettizeSpec) -> float:
    """Size of everything the plan does not choose: other LUT weights, the rest in fp16."""
    chosen = {w.name for w in candidates}
    others = sum(_lut_mb(w, base.nbits, base) for w in weights if w.name not in chosen)
    palettized = {w.name for w in weights}
    rest = sum(p.numel() for n, p in module.named_parameters() if n not in palettized)
    return others + rest * 2 / 1e6


def _greedy_curve(candidates, bits, mse, fixed_mb, peak) -> list[dict]:
    plan = {w.name: bits[0] for w in candidates}
    by_name = {w.name: w for w in candidates}
    base = PalettizeSpec(nbits=bits[0])

    def point():
        size = fixed_mb + sum(_lut_mb(by_name[n], b, base) for n, b in plan.items())
        total = sum(mse[(n, b)] for n, b in plan.items())
        return {"size_mb": round(size, 4), "predicted_psnr_db": round(_psnr(peak, total), 3),
                "bits": dict(plan)}

    curve = [point()]
    while True:
        steps = [(n, bits[bits.index(b) + 1]) for n, b in plan.items() if b != bits[-1]]
        if not steps:
            return curve
        cost = lambda s: ((mse[s] - mse[(s[0], plan[s[0]])]) /  # noqa: E731
                          max(_lut_mb(by_name[s[0]], plan[s[0]], base)
                              - _lut_mb(by_name[s[0]], s[1], base), 1e-12))
        name, nbits = min(steps, key=cost)
        plan[name] = nbits
        curve.append(point())


def _measure_points(curve, chosen, module, params, base, inputs, ref) -> None:
    step = max(1, len(curve) // CHECKED_POINTS)
    points = {id(p): p for p in curve[::step] + [curve[-1], chosen]}
    peak = _peak(ref)
    for p in points.values():
        out = _run_palettized(module, params, p["bits"], base, inputs)
        p["measured_psnr_db"] = round(_psnr(peak, _mse(ref, out)), 3)


def _public(point: dict) -> dict:
    bits = list(point["bits"].values())
    return {"size_mb": point["size_mb"], "predicted_psnr_db": point["predicted_psnr_db"],
            "measured_psnr_db": point.get("measured_psnr_db"),
            "layers_per_nbits": {str(b): bits.count(b) for b in sorted(set(bits))},
            "bits": point["bits"]}


def _write_curve(out_dir: Path, summary: dict, curve: list[dict]) -> None:
    data = {**summary, "points": [{k: v for k, v in p.items() if k != "bits"} for p in curve]}
    (out_dir / CURVE_JSON).write_text(json.dumps(data, indent=2) + "\n")
    plot_curve(data, out_dir / CURVE_PNG)


def plot_curve(data: dict, path: Path) -> Path:
    """Render the curve JSON's points (predicted line, measured dots, target line)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state to set

    points = data["points"]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot([p["size_mb"] for p in points], [p["predicted_psnr_db"] for p in points],
            label="predicted (sum of per-layer MSE)")
    measured = [p for p in points if p.get("measured_psnr_db") is not None]
    ax.scatter([p["size_mb"] for p in measured], [p["measured_psnr_db"] for p in measured],
               color="C1", label="measured (all layers together)", zorder=3)
    ax.axvline(data["target_size_mb"], color="gray", linestyle="--", label="target size")
    ax.set_xlabel("estimated weight size (MB)")
    ax.set_ylabel("output PSNR (dB)")
    ax.set_title(f"mixed-bit palettization ({data['layers_measured']} layers measured)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
