"""The export engine: recipe -> reference run -> surgery -> exporter -> manifest.

One explicit registry maps a recipe's ``format`` to its :class:`Exporter` (see
:func:`exporters`); an exporter converts one component at a time and may add bundle-level
files at the end. Everything is written into a temp folder renamed onto ``out`` only when
complete (:func:`mobile_sd.utils.files.atomic_output_dir`).

Memory: once its component is built, the model no longer holds the module, so an exporter may
set ``comp.module = None`` after converting it to free the eager weights (GBs at full size)
before compression.

Example (not run by the tests: it needs real artifacts)::

    manifest = run_export(load_recipe("export_recipes/onnx-snapfusion.yaml"),
                          build_model("snapfusion-tiny"), Path("out/onnx"))
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Protocol

from mobile_sd.export.components import (ExportComponent, decoder_component,
                                         text_encoder_component, unet_component)
from mobile_sd.manifest import ComponentEntry, FileEntry, Manifest, write_manifest
from mobile_sd.recipes import Recipe, ResolvedComponent
from mobile_sd.utils.env import peak_rss_mb, release_freed_memory
from mobile_sd.utils.files import atomic_output_dir

REFERENCE_FILE = "reference_io.safetensors"
Progress = Callable[[str], None]


class Exporter(Protocol):
    """What the engine needs from a format (Core ML, ExecuTorch, ONNX)."""
    format: str

    def export_component(self, comp: ExportComponent, settings: ResolvedComponent,
                         recipe: Recipe, out_dir: Path, reference, progress: Progress) -> dict:
        """Write ``comp``'s files into ``out_dir``; return the format's manifest details
        (``files`` as :class:`~mobile_sd.manifest.FileEntry` plus format-specific keys)."""

    def finish(self, model, recipe: Recipe, out_dir: Path, manifest: Manifest) -> None:
        """Bundle-level files and notes once every component is written."""


def exporters() -> dict[str, Exporter]:
    """The registry: recipe ``format`` -> exporter."""
    from mobile_sd.export.coreml.flow import CoreMLExporter
    from mobile_sd.export.executorch.flow import ExecuTorchExporter
    from mobile_sd.export.onnx.flow import OnnxExporter
    from mobile_sd.export.qnn.flow import QnnExporter

    return {e.format: e for e in (CoreMLExporter(), ExecuTorchExporter(), OnnxExporter(),
                                  QnnExporter())}


def surgery_passes(recipe: Recipe, settings: ResolvedComponent,
                   prediction_type: str = "epsilon") -> list[str]:
    """The ordered surgery for one component (``prediction_type``: what the model's UNet
    predicts, from its scheduler spec). Order matters:

    1. ``linear_to_conv`` first when attention is split-einsum (it runs on the (B,C,1,S)
       layout the pass creates);
    2. the attention kernel;
    3. format rewrites (Core ML fp16 text encoder: fp16-safe mask; XNNPACK: its passes);
    4. the recipe's extra passes;
    5. ``cfg_fold`` last: it wraps the module and changes its inputs;
    6. ``v_to_epsilon`` last (``interface: swift``, v-prediction UNet): Apple's Swift app has
       epsilon schedulers only, so the wrapper converts the output in the graph.
    """
    passes: list[str] = []
    if settings.attention in ("split_einsum", "split_einsum_v2"):
        passes.append("linear_to_conv")
    passes.append("attention_original" if settings.attention == "original" else settings.attention)
    if settings.name == "text_encoder" and recipe.format == "coreml" and settings.precision == "fp16":
        passes.append("fp16_safe_attention_mask")
    if recipe.format == "executorch" and recipe.backend == "xnnpack":
        from mobile_sd.surgery import xnnpack_passes_for

        passes += xnnpack_passes_for(settings.name, settings.precision)
    passes += [p for p in settings.passes if p not in passes]
    if settings.name == "unet" and recipe.cfg == "folded":
        passes.append("cfg_fold")
    if settings.name == "unet" and recipe.interface == "swift":
        passes += _swift_output_pass(recipe, prediction_type)
    return passes


def _swift_output_pass(recipe: Recipe, prediction_type: str) -> list[str]:
    """What the Swift app's epsilon-only schedulers need after the UNet."""
    from mobile_sd.errors import RecipeError

    if prediction_type == "epsilon":
        return []
    if prediction_type == "v_prediction":
        if recipe.cfg == "folded":
            raise RecipeError(f"recipe {recipe.name!r}: interface 'swift' takes cfg 'batch2' "
                              "(the app does guidance itself), not 'folded'")
        return ["v_to_epsilon"]
    raise RecipeError(f"recipe {recipe.name!r}: interface 'swift' needs an 'epsilon' or "
                      f"'v_prediction' UNet (the Swift app's schedulers take epsilon); this "
                      f"model predicts {prediction_type!r}")


def _resolve_pass(name: str, spec):
    """A pass name, or the pass built from the model's spec when it needs the spec's values
    (``v_to_epsilon``: the training noise schedule)."""
    if name == "v_to_epsilon":
        from mobile_sd.surgery.v_to_epsilon import VToEpsilonPass

        return VToEpsilonPass.for_spec(spec.scheduler)
    return name


def build_component(model, name: str, recipe: Recipe, passes: list[str]) -> ExportComponent:
    """Apply surgery to ``model``'s module and wrap it with the recipe's I/O contract."""
    from mobile_sd.surgery import apply_passes

    spec = model.spec
    module = apply_passes(getattr(model, name), [_resolve_pass(p, spec) for p in passes], name)
    latent, chans = recipe.latent_size, spec.decoder.latent_channels
    if name == "text_encoder":
        comp = text_encoder_component(module, spec.text_encoder.max_length,
                                      spec.text_encoder.hidden_size, recipe.interface)
    elif name == "unet":
        comp = unet_component(module, latent, spec.unet.in_channels, spec.text_encoder.max_length,
                              spec.unet.cross_attention_dim, recipe.cfg, recipe.interface,
                              recipe.calibration.guidance or spec.scheduler.default_guidance)
    else:
        comp = decoder_component(module, latent, chans, recipe.interface,
                                 spec.decoder.vae_scale_factor)
    comp.passes = tuple(passes)
    return comp


def record_reference(model, recipe: Recipe, full: bool):
    """Run the fp32 reference pipeline and record every component call.

    ``full``: every calibration prompt x every step (int8 calibration data); otherwise one
    prompt and one step, enough for reference I/O that a device can verify itself against.
    """
    from mobile_sd.pipeline.record import record_runs

    cal = recipe.calibration
    model.spec = dataclasses.replace(model.spec, unet=dataclasses.replace(
        model.spec.unet, sample_size=recipe.latent_size))
    guidance = cal.guidance or model.spec.scheduler.default_guidance
    recorder, _ = record_runs(model, cal.prompts if full else cal.prompts[:1],
                              cal.steps if full else 1, guidance, seed=cal.seed)
    return recorder


def swift_app_settings(spec) -> dict:
    """What Apple's Swift app must be set to for this bundle (``PipelineConfiguration``):
    DPM-Solver++ (its only scheduler besides PNDM that suits few steps), linspace timesteps,
    NumPy RNG, the model's steps and guidance; the UNet outputs epsilon (``v_to_epsilon``)."""
    sched = spec.scheduler
    return {"scheduler": "dpmpp", "steps": sched.default_steps,
            "guidance": sched.default_guidance, "timestep_spacing": "linspace",
            "rng": "numpy", "unet_output": "epsilon",
            "model_prediction_type": sched.prediction_type,
            "decoder_scale_factor": spec.decoder.scaling_factor}


def _new_manifest(recipe: Recipe, model) -> Manifest:
    from mobile_sd.models.folder import scheduler_config

    pipeline = {"steps": model.spec.scheduler.default_steps,
                "guidance": model.spec.scheduler.default_guidance, "cfg": recipe.cfg,
                "latent_size": recipe.latent_size, "scaling_factor": model.spec.decoder.scaling_factor,
                "vae_scale_factor": model.spec.decoder.vae_scale_factor,
                "scheduler": scheduler_config(model.spec.scheduler)}
    if recipe.interface == "swift":
        pipeline["swift_app"] = swift_app_settings(model.spec)
    manifest = Manifest.new(recipe.to_dict(), model.source, model.spec.name, pipeline,
                            recipe.format, recipe.backend)
    # What the weights were stored as (the fp32 reference upcasts fp16/bf16 files).
    manifest.model.update(stored_dtype=model.stored_dtype,
                          weights_variants={k: v for k, v in model.variants.items() if v})
    return manifest


def _export_one(exporter: Exporter, model, name: str, recipe: Recipe, out: Path, reference,
                bar) -> ComponentEntry:
    settings = recipe.component(name)
    start = time.perf_counter()
    bar.set_postfix_str(f"{name}: surgery")
    passes = surgery_passes(recipe, settings, model.spec.scheduler.prediction_type)
    comp = build_component(model, name, recipe, passes)
    setattr(model, name, None)  # comp holds the module now; the exporter may free it
    details = exporter.export_component(
        comp, settings, recipe, out, reference,
        progress=lambda phase: bar.set_postfix_str(f"{name}: {phase}"))
    return ComponentEntry.from_export(
        details, interface=comp.interface, surgery=list(comp.passes), inputs=comp.inputs,
        outputs=comp.outputs, export_seconds=round(time.perf_counter() - start, 2),
        peak_rss_mb=round(peak_rss_mb(), 1), min_psnr_db=settings.min_psnr_db)


def run_export(recipe: Recipe, model, out: Path, overwrite: bool = False) -> Manifest:
    """Export every component of ``model`` per ``recipe`` into ``out``; returns the manifest."""
    from tqdm.auto import tqdm

    exporter = exporters()[recipe.format]
    names = recipe.exported_components()
    # int8 (PT2E) and w8a16 (QNN QDQ) calibrate on every recorded prompt x step
    needs_calibration = any(recipe.component(n).precision in ("int8", "w8a16") for n in names)
    manifest = _new_manifest(recipe, model)
    with atomic_output_dir(out, overwrite=overwrite, kind="export") as tmp:
        bar = tqdm(total=len(names) + 1, desc="export", unit="component")
        bar.set_postfix_str("reference pipeline run")
        reference = record_reference(model, recipe, full=needs_calibration)
        reference.save(tmp / REFERENCE_FILE)
        manifest.extra_files.append(FileEntry.of(tmp, tmp / REFERENCE_FILE, role="reference_io"))
        bar.update()
        for name in names:
            manifest.components[name] = _export_one(exporter, model, name, recipe, tmp,
                                                    reference, bar)
            release_freed_memory()   # the next component's lowering peak starts lower
            bar.update()
        bar.close()
        exporter.finish(model, recipe, tmp, manifest)
        write_manifest(tmp, manifest)
    return manifest
