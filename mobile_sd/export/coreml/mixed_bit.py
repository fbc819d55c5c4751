"""Mixed-bit palettization in the Core ML flow: the recipe's ``mixed_bit`` -> bits per weight.

The algorithm is :mod:`mobile_sd.compress.mixed_bit` (per-weight sensitivity = output PSNR
with only that weight palettized; a greedy descent by predicted error per byte saved; every
curve point measured with all weights palettized together). This module feeds it what the
export has and a user asked for:

* the inputs: the UNet's **recorded reference inputs** (the ``mobile-sd export`` pipeline run),
  mapped onto the export interface by ``comp.from_call``; the module after surgery;
* the size target: ``target_size_mb`` (10^6 bytes) for the whole UNet's weights, i.e. the
  ``max_layers`` measured weights plus everything else (other palettized weights at the
  recipe's ``nbits``, the rest fp16);
* the recipe's granularity / group size / ``weight_threshold``; ``op_name`` entries of the
  recipe win over the plan (a user's pin).

Writes ``mixed_bit_curve.json`` (sensitivities, measured curve, uniform baselines, the choice)
and ``mixed_bit_curve.png``. Cost: ``max_layers x len(candidate_bits)`` forward passes of the
UNet plus ~10 measured points: seconds on tiny specs, about an hour at full size on 2 cores.

Example (not run by the tests: it needs real artifacts)::

    bits, summary = plan_mixed_bit(comp, config, recipe.mixed_bit, reference, out_dir)
    config = apply_plan(config, bits, fp16=True)
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from mobile_sd.compress.config import CompressionConfig
from mobile_sd.compress.recipe import palettization
from mobile_sd.errors import CalibrationError, InvalidArgumentError, RecipeError

CURVE_JSON = "mixed_bit_curve.json"
CURVE_PNG = "mixed_bit_curve.png"
CURVE_POINTS = 6


def plan_mixed_bit(comp, config: CompressionConfig, mixed, reference, out_dir: Path):
    """``({module name: nbits}, summary for the manifest)``; writes the curve JSON and PNG."""
    from mobile_sd.compress import mixed_bit as mb
    from mobile_sd.compress.mixed_bit_plot import plot_curve

    base = palettization(config)
    module, inputs = comp.module.eval(), [_reference_inputs(comp, reference)]
    options = dict(granularity=base.granularity, group_size=base.group_size)
    sens = mb.measure_sensitivity(module, inputs, mixed.candidate_bits,
                                  max_tensors=mixed.max_layers,
                                  weight_threshold=config.weight_threshold, **options)
    if not sens:
        raise RecipeError(f"mixed_bit: the {comp.name} has no weight the compression config "
                          "palettizes (all at or below weight_threshold)")
    curve = mb.pareto_curve(module, inputs, sens, points=CURVE_POINTS, others_nbits=base.nbits,
                            weight_threshold=config.weight_threshold, **options)
    bits = _choose(sens, mixed.target_size_mb * 1e6 - curve.fixed_bytes, mixed, curve)
    others = {op.module: base.nbits for op in mb.selected_ops(
        module, base.nbits, base.granularity, base.group_size, config.weight_threshold, None)
        if op.module not in bits}
    size = curve.fixed_bytes + mb.total_bytes(sens, bits)
    psnr = mb.measure_assignment(module, inputs, {**others, **bits}, **options)
    chosen = {"size_mb": round(size / 1e6, 4), "measured_psnr_db": round(psnr, 3),
              "predicted_psnr_db": round(mb.predicted_psnr_db(sens, bits), 3),
              "layers_per_nbits": _histogram(bits), "bits": bits}
    data = {**curve.to_json(), "target_size_mb": mixed.target_size_mb, "chosen": chosen}
    Path(out_dir, CURVE_JSON).write_text(json.dumps(data, indent=2, default=str) + "\n")
    plot_curve(data, Path(out_dir, CURVE_PNG), title=f"{comp.name}: mixed-bit palettization")
    summary = {"target_size_mb": mixed.target_size_mb, "candidate_bits": list(mixed.candidate_bits),
               "layers_measured": len(sens), "others_nbits": base.nbits,
               "chosen": {k: v for k, v in chosen.items() if k != "bits"},
               "curve": CURVE_JSON, "plot": CURVE_PNG}
    return bits, summary


def _reference_inputs(comp, reference) -> tuple:
    calls = reference.calls(comp.name) if reference is not None else []
    if not calls:
        raise CalibrationError(f"mixed_bit: no recorded {comp.name} call to measure "
                               "sensitivity on; the reference pipeline run recorded none")
    inputs, _ = comp.from_call(calls[0])
    return inputs


def _choose(sens, budget: float, mixed, curve) -> dict[str, int]:
    from mobile_sd.compress import mixed_bit as mb

    try:
        return mb.choose_bits(sens, budget)
    except InvalidArgumentError:
        smallest = (curve.fixed_bytes + mb.total_bytes(sens, mb.descent_path(sens)[-1])) / 1e6
        raise RecipeError(f"mixed_bit: target_size_mb {mixed.target_size_mb} is below the "
                          f"smallest reachable size {smallest:.2f} MB with candidate_bits "
                          f"{list(mixed.candidate_bits)} and max_layers {mixed.max_layers}; "
                          "raise the target, add lower bits or measure more layers") from None


def _histogram(bits: dict[str, int]) -> dict[str, int]:
    values = list(bits.values())
    return {str(b): values.count(b) for b in sorted(set(values))}


def apply_plan(config: CompressionConfig, bits: dict[str, int], fp16: bool) -> CompressionConfig:
    """``config`` plus an ``op_name`` spec per planned weight (Core ML const names); the
    recipe's own ``op_name`` entries win.

    >>> from mobile_sd.compress.config import PalettizeSpec
    >>> cfg = CompressionConfig(global_=PalettizeSpec(6))
    >>> sorted(apply_plan(cfg, {"unet.conv_in": 4}, fp16=True).op_name)
    ['p_unet_conv_in_weight_to_fp16']
    """
    from mobile_sd.compress.coreml_apply import coreml_const_name

    base = palettization(config)
    planned = {}
    for module, nbits in bits.items():
        name = coreml_const_name(f"{module}.weight")
        planned[name if fp16 else name.removesuffix("_to_fp16")] = dataclasses.replace(
            base, nbits=nbits)
    return dataclasses.replace(config, op_name={**planned, **dict(config.op_name)})
