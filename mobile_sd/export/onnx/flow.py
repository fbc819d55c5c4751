"""``format: onnx`` recipes: one ONNX graph per component (named I/O, simplified).

``interface: native`` writes ``<component>.onnx`` with the native I/O and static shapes;
``interface: optimum`` writes the diffusers/optimum folder (:mod:`.optimum`): optimum's I/O
names, dynamic batch/height/width, configs, tokenizer, scheduler and ``model_index.json``.
ONNX is the portable reference: every file runs in onnxruntime on this machine.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from mobile_sd.export.components import ExportComponent
from mobile_sd.names import FILE_STEMS
from mobile_sd.manifest import FileEntry
from mobile_sd.pipeline.recorder import Recorder
from mobile_sd.recipes import Recipe, ResolvedComponent


def export_component(comp: ExportComponent, settings: ResolvedComponent, recipe: Recipe,
                     out_dir: Path, reference: Recorder,
                     progress: Callable[[str], None] = lambda phase: None) -> dict:
    """Export one component to ONNX; returns its manifest entry."""
    from mobile_sd.export.onnx.convert import export_onnx
    from mobile_sd.export.onnx import optimum

    layout = "optimum" if comp.interface == "optimum" else "files"
    progress(f"onnx export ({settings.precision}, {layout} layout)")
    if layout == "optimum":   # comp already has optimum's I/O (export/components.py)
        out, dynamic = optimum.model_path(out_dir, comp.name), optimum.dynamic_shapes(comp.name)
    else:
        out, dynamic = out_dir / f"{FILE_STEMS[comp.name]}.onnx", None
    result = export_onnx(comp.module, comp.example_inputs(), out, input_names=comp.input_names,
                         output_names=comp.output_names, opset=recipe.options.onnx_opset,
                         simplify=True, fp16=settings.precision == "fp16",
                         dynamic_shapes=dynamic)
    files = [FileEntry.of(out_dir, Path(p), backend="onnxruntime",
                          role="model" if Path(p).suffix == ".onnx" else "weights")
             for p in result.paths]
    return {"files": files, "backend": "onnxruntime", "precision": settings.precision,
            "opset": recipe.options.onnx_opset, "layout": layout,
            **{k: v for k, v in result.to_dict().items()
               if k in ("simplified", "node_count", "notes", "dynamic_axes")}}


class OnnxExporter:
    """``format: onnx`` in the export engine's registry."""
    format = "onnx"
    export_component = staticmethod(export_component)

    @staticmethod
    def finish(model, recipe: Recipe, out_dir: Path, manifest) -> None:
        """``layout: optimum``: the configs, tokenizer, scheduler and ``model_index.json``."""
        if recipe.interface == "optimum":
            from mobile_sd.export.onnx.optimum import write_pipeline_files

            write_pipeline_files(model, out_dir, manifest)
