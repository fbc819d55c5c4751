"""``format: executorch`` recipes: one ``.pte`` per component (+ ``.ptd``, ``.bpte``, ETRecord).

``weights: inline`` (the Android recipes) keeps the weights inside the ``.pte``: the stock
Android ``Module.load(path)`` passes no data file. A ``.bpte`` is bundled only for programs
under its 2 GiB flatbuffer cap; the others are listed in the manifest's ``skipped``.

Called by :func:`mobile_sd.export.engine.run_export` after surgery. int8 components are calibrated
on the reference pipeline's recorded calls (every calibration prompt x every step x both CFG
branches), never on random tensors, and keep their most sensitive layers in fp32 (measured).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from mobile_sd.export.components import ExportComponent
from mobile_sd.names import FILE_STEMS
from mobile_sd.errors import CalibrationError
from mobile_sd.manifest import FileEntry
from mobile_sd.pipeline.recorder import Recorder
from mobile_sd.recipes import Recipe, ResolvedComponent

FORMATS_BY_ROLE = {"pte": "model", "ptd": "weights", "bpte": "bundled_program",
                   "etrecord": "etrecord"}
# Layers whose quantization error matters most in diffusion UNets/decoders (input/output
# projections, time embedding): the candidates measured for the fp32 fallback list.
FALLBACK_CANDIDATES = ("conv_in", "conv_out", "time_embedding.linear_1",
                       "time_embedding.linear_2", "post_quant_conv", "decoder.conv_in",
                       "decoder.conv_out")


def reference_calls(comp: ExportComponent, reference: Recorder) -> list[tuple[tuple, tuple]]:
    """(inputs, expected outputs) of every recorded call of this component, in its interface."""
    calls = reference.calls(comp.name)
    if not calls:
        raise CalibrationError(f"no recorded {comp.name} calls in the reference run; the "
                               "export cannot build calibration data or bundled I/O")
    return [comp.from_call(call) for call in calls]


def _fallback(comp: ExportComponent, settings: ResolvedComponent, recipe: Recipe,
              calibration: list[tuple]) -> tuple[list[str], list]:
    """fp32 fallback list: the recipe's names plus the N most sensitive measured candidates."""
    from mobile_sd.compress.pt2e import layer_sensitivity

    names = dict(comp.module.named_modules())
    prefix = "unet." if "unet.unet" in names or any(n.startswith("unet.") for n in names) else ""
    candidates = [prefix + c for c in FALLBACK_CANDIDATES if prefix + c in names]
    keep = recipe.calibration.sensitive_fallback
    measured = []
    if keep and candidates:
        measured = layer_sensitivity(comp.module, comp.example_inputs(), calibration[:4], candidates)
    chosen = choose_fallback(measured, keep)
    return list(settings.fp32_fallback) + [n for n in chosen if n not in settings.fp32_fallback], measured


def choose_fallback(measured: list[tuple[str, float]], keep: int) -> list[str]:
    """Up to ``keep`` layers from ``layer_sensitivity`` (keep_fp32 mode, best SQNR first) whose
    fp32 fallback measurably beats all-int8 (its ``<all int8>`` baseline row): keeping a layer
    in fp32 that does not raise the output SQNR only costs speed."""
    baseline = dict(measured).get("<all int8>", float("-inf"))
    return [name for name, sqnr in measured if not name.startswith("<") and sqnr > baseline][:keep]


def export_component(comp: ExportComponent, settings: ResolvedComponent, recipe: Recipe,
                     out_dir: Path, reference: Recorder,
                     progress: Callable[[str], None] = lambda phase: None) -> dict:
    """Export one component; returns its manifest entry."""
    from mobile_sd.export.executorch.lower import export_pte

    stem = FILE_STEMS[comp.name]
    pairs = reference_calls(comp, reference)
    calibration, fallback, sensitivity = None, list(settings.fp32_fallback), []
    if settings.precision == "int8":
        progress("calibration")
        calibration = [inputs for inputs, _ in pairs]
        if recipe.backend == "xnnpack":
            progress("sensitivity")
            fallback, sensitivity = _fallback(comp, settings, recipe, calibration)
    progress(f"lowering ({recipe.backend}, {settings.precision})")
    bundled = [pairs[0]] if recipe.options.bundled_io else None
    result = export_pte(
        comp.module, comp.example_inputs(), out_dir / f"{stem}.pte", backend=recipe.backend,
        precision=settings.precision, calibration=calibration, fp32_fallback=fallback,
        separate_weights=recipe.options.weights == "separate", input_names=comp.input_names,
        output_names=comp.output_names, coreml_target=recipe.target
        if recipe.backend == "coreml" else "iOS17",
        etrecord_path=out_dir / f"{stem}.etrecord" if recipe.options.etrecord != "none" else None,
        etrecord_weights=recipe.options.etrecord == "full",
        bundled_io=[(i, None if settings.precision.startswith("int") else o) for i, o in bundled]
        if bundled else None, qnn_soc=recipe.options.qnn_soc, overwrite=True)
    files = []
    for path in result.paths:
        path = Path(path)
        kind = path.suffix[1:]
        files.append(FileEntry.of(out_dir, path, backend=recipe.backend,
                                  role=FORMATS_BY_ROLE.get(kind, kind)))
    entry = {"files": files, "backend": recipe.backend, "precision": settings.precision,
             "delegation": result.delegation, "fp32_fallback": fallback,
             "sensitivity": [{"layer": n, "sqnr_db": s} for n, s in sensitivity],
             "calibration_samples": len(calibration or []), "notes": result.notes}
    if result.delegate_limits:
        entry["delegate_limits"] = result.delegate_limits
    if result.bundle_skipped:
        entry["bundle_skipped"] = result.bundle_skipped
    return entry


def finish(model, recipe: Recipe, out_dir: Path, manifest: dict) -> None:
    """Bundle-level notes: what cannot be verified on this machine."""
    import platform

    for name, comp in manifest.components.items():
        if comp.details.get("bundle_skipped"):
            manifest.skipped.append({"step": f"{name}: bundled program (.bpte)",
                                     "reason": comp.details["bundle_skipped"]})
    if recipe.backend == "coreml" and platform.system() != "Darwin":
        manifest.skipped.append({
            "step": "run / verify Core ML-delegated .pte",
            "reason": "the Core ML delegate runs only on Apple platforms (CoreMLBackend is not "
                      "registered in the Linux runtime)"})
    if recipe.backend == "coreml":
        manifest.skipped.append({
            "step": "conv palettization in the Core ML delegate",
            "reason": "the delegate carries linear quantization only; palettize convs with the "
                      "standalone Core ML export (export_recipes/ios-snapfusion-fast.yaml)"})


class ExecuTorchExporter:
    """``format: executorch`` in the export engine's registry."""
    format = "executorch"
    export_component = staticmethod(export_component)
    finish = staticmethod(finish)
