"""``format: qnn`` recipes: one QNN HTP context binary per component, for one Snapdragon SoC.

Per component: ONNX export (static shapes, opset 21, :func:`mobile_sd.export.onnx.convert.
export_onnx`) -> for ``w8a16`` a QDQ model calibrated on the reference pipeline's recorded calls
(every calibration prompt x step, mapped through ``comp.from_call``; the engine records the full
run for ``w8a16``) with the HTP's numerics-preserving surgery (additive-mask clamp, GELU fusion:
:mod:`.quantize`) -> compiled by QAIRT's HTP compiler (ONNX Runtime's QNN EP, on this host the
x86_64 emulator libraries) into ``<stem>.onnx`` (EPContext wrapper, manifest format
``qnn_context``) + ``<stem>_qnn.bin`` (the context binary, ``qnn_bin``).

Every node must run on the HTP: otherwise UnsupportedOpError names the nodes that would fall back
and why. Where onnxruntime-qnn cannot load, BackendUnavailableError (one line, exit 2) before any
work. Intermediate ONNX files live in a temp folder removed at the end; the engine renames its
whole output folder into place only when every component is written.
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from mobile_sd.errors import CalibrationError
from mobile_sd.export.components import ExportComponent
from mobile_sd.manifest import FileEntry
from mobile_sd.names import FILE_STEMS
from mobile_sd.pipeline.recorder import Recorder
from mobile_sd.recipes import Recipe, ResolvedComponent

CONTEXT_FORMAT = "qnn_context"   # the EPContext wrapper .onnx ONNX Runtime loads
BIN_FORMAT = "qnn_bin"           # the QNN context binary it points to
BACKEND = "qnn-htp"


def calibration_samples(comp: ExportComponent, reference: Recorder) -> list[dict]:
    """Every recorded call of ``comp`` as ``{input name: ndarray}`` in the export interface."""
    calls = reference.calls(comp.name)
    if not calls:
        raise CalibrationError(f"no recorded {comp.name} calls in the reference run; w8a16 "
                               "needs them as calibration data")
    samples = []
    for call in calls:
        inputs, _ = comp.from_call(call)
        samples.append({spec.name: t.detach().cpu().contiguous().numpy()
                        for spec, t in zip(comp.inputs, inputs)})
    return samples


def _onnx_model(comp: ExportComponent, settings: ResolvedComponent, recipe: Recipe,
                reference: Recorder, work: Path, progress) -> tuple[Path, dict | None]:
    """The float ONNX model (fp16: the HTP computes it in fp16) or its w8a16 QDQ model."""
    from mobile_sd.export.onnx.convert import export_onnx
    from mobile_sd.export.qnn.quantize import quantize_w8a16
    from mobile_sd.utils.env import release_freed_memory

    progress(f"onnx export (opset {recipe.options.opset})")
    float_path = work / f"{FILE_STEMS[comp.name]}_float.onnx"
    export_onnx(comp.module, comp.example_inputs(), float_path, input_names=comp.input_names,
                output_names=comp.output_names, opset=recipe.options.opset, simplify=True)
    comp.module = None   # the eager weights are no longer needed (GBs at full size)
    release_freed_memory()   # ... and handed back before calibration and compile
    if settings.precision != "w8a16":
        return float_path, None
    progress("w8a16 calibration")
    qdq_path = work / f"{FILE_STEMS[comp.name]}_w8a16.onnx"
    info = quantize_w8a16(float_path, qdq_path, calibration_samples(comp, reference),
                          mask_floor=recipe.options.mask_floor)
    return qdq_path, info


def export_component(comp: ExportComponent, settings: ResolvedComponent, recipe: Recipe,
                     out_dir: Path, reference: Recorder,
                     progress: Callable[[str], None] = lambda phase: None) -> dict:
    """Export one component to a context binary; returns its manifest entry."""
    from mobile_sd.runtimes.qnn import htp
    from mobile_sd.runtimes.qnn.socs import get_soc

    htp.require_htp()                       # one clear line before any work
    soc = get_soc(recipe.options.soc)
    work = Path(tempfile.mkdtemp(prefix=f".qnn-{comp.name}.", dir=out_dir))
    try:
        model, quant = _onnx_model(comp, settings, recipe, reference, work, progress)
        progress(f"HTP compile ({soc.name}, {settings.precision})")
        ctx = htp.compile_context(model, out_dir / f"{FILE_STEMS[comp.name]}.onnx", soc,
                                  settings.precision)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    files = [dataclasses.replace(FileEntry.of(out_dir, ctx.onnx_path, role="model",
                                              backend=BACKEND), format=CONTEXT_FORMAT)]
    files += [dataclasses.replace(FileEntry.of(out_dir, p, role="context_binary",
                                               backend=BACKEND), format=BIN_FORMAT)
              for p in ctx.bin_paths]
    entry = ctx.manifest()
    details = {"soc": entry["soc"], "soc_model": entry["soc_model"], "htp_arch": entry["htp_arch"],
               "qairt": entry["qairt"], "ep_sdk_version": entry["ep_sdk_version"],
               "onnxruntime_qnn": entry["onnxruntime_qnn"], "opset": recipe.options.opset,
               "htp": entry.get("htp")}
    if quant is not None:
        details["quantization"] = quant
    return {"files": files, "backend": BACKEND, "precision": settings.precision, **details}


class QnnExporter:
    """``format: qnn`` in the export engine's registry."""
    format = "qnn"
    export_component = staticmethod(export_component)

    @staticmethod
    def finish(model, recipe: Recipe, out_dir: Path, manifest) -> None:
        """Context binaries have no bundle-level files."""
