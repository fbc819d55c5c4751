"""``mobile-sd export``: recipe -> load -> reference run -> surgery -> export -> manifest.

Every format module in ``mobile_sd.exporters`` provides
``export_component(comp, settings, recipe, out_dir, reference, progress) -> dict`` (the
component's manifest entry; ``reference`` is the recorded pipeline run) and optionally
``finish(model, recipe, out_dir, manifest)`` for bundle-level files. Everything is written into
a temp folder renamed onto ``--out`` only when complete.

Memory: once its component is built, the model no longer holds the module, so an exporter may
set ``comp.module = None`` after converting it to free the eager weights (GBs at full size)
before compression.
"""
from __future__ import annotations

import argparse
import contextlib
import signal
import threading
import time
from importlib import import_module
from pathlib import Path

from mobile_sd.components import (ExportComponent, decoder_component, text_encoder_component,
                                  unet_component)
from mobile_sd.errors import ExportInterruptedError, RecipeError
from mobile_sd.manifest import file_entry, new_manifest, write_manifest
from mobile_sd.recipes import Recipe, ResolvedComponent, load_recipe
from mobile_sd.utils.env import peak_rss_mb, release_freed_memory
from mobile_sd.utils.files import atomic_output_dir

REFERENCE_FILE = "reference_io.safetensors"


def surgery_passes(recipe: Recipe, settings: ResolvedComponent) -> list[str]:
    """The ordered surgery for one component: attention kernel, backend rewrites, user passes,
    CFG folding last (it wraps the module and changes its inputs)."""
    passes: list[str] = []
    if settings.attention in ("split_einsum", "split_einsum_v2"):
        passes.append("linear_to_conv")  # split einsum runs on the (B, C, 1, S) layout
    passes.append("attention_original" if settings.attention == "original" else settings.attention)
    if settings.name == "text_encoder" and recipe.format == "coreml" and settings.precision == "fp16":
        passes.append("fp16_safe_attention_mask")
    if recipe.format == "executorch" and recipe.backend == "xnnpack":
        from mobile_sd.surgery import xnnpack_passes_for

        passes += xnnpack_passes_for(settings.name, settings.precision)
    passes += [p for p in settings.passes if p not in passes]
    if settings.name == "unet" and recipe.cfg == "folded":
        passes.append("cfg_fold")
    return passes


def build_component(model, name: str, recipe: Recipe, passes: list[str]) -> ExportComponent:
    """Apply surgery to ``model``'s module and wrap it with the recipe's I/O contract."""
    from mobile_sd.surgery import apply_passes

    spec = model.spec
    module = {"text_encoder": model.text_encoder, "unet": model.unet, "decoder": model.decoder}[name]
    module = apply_passes(module, passes, name)
    latent, chans = recipe.latent_size, spec.decoder.latent_channels
    if name == "text_encoder":
        comp = text_encoder_component(module, spec.text_encoder.max_length,
                                      spec.text_encoder.hidden_size, recipe.interface)
    elif name == "unet":
        comp = unet_component(module, latent, spec.unet.in_channels, spec.text_encoder.max_length,
                              spec.unet.cross_attention_dim, recipe.cfg, recipe.interface,
                              recipe.calibration.guidance or spec.scheduler.default_guidance)
    else:
        comp = decoder_component(module, latent, chans, recipe.interface)
    comp.passes = tuple(passes)
    return comp


def record_reference(model, recipe: Recipe, full: bool):
    """Run the fp32 reference pipeline and record every component call.

    ``full``: every calibration prompt x every step (int8 calibration data); otherwise one
    prompt and one step, enough for reference I/O that a device can verify itself against.
    """
    import dataclasses

    from mobile_sd.pipeline.recorder import Recorder
    from mobile_sd.pipeline.reference import generate

    cal = recipe.calibration
    model.spec = dataclasses.replace(model.spec, unet=dataclasses.replace(
        model.spec.unet, sample_size=recipe.latent_size))
    recorder = Recorder()
    guidance = cal.guidance or model.spec.scheduler.default_guidance
    for i, prompt in enumerate(cal.prompts if full else cal.prompts[:1]):
        recorder.context = {"prompt": i, "guidance": guidance}
        generate(model, prompt, steps=(cal.steps if full else 1), guidance=guidance,
                 seed=cal.seed + i, recorder=recorder, progress=False)
    return recorder


def run_export(recipe: Recipe, model, out: Path, overwrite: bool = False) -> dict:
    """Export every component of ``model`` per ``recipe`` into ``out``; returns the manifest."""
    from tqdm.auto import tqdm

    from mobile_sd.models.folder import scheduler_config

    exporter = import_module(f"mobile_sd.exporters.{recipe.format}_flow")
    names = recipe.exported_components()
    needs_calibration = any(recipe.component(n).precision == "int8" for n in names)
    pipeline = {"steps": model.spec.scheduler.default_steps,
                "guidance": model.spec.scheduler.default_guidance, "cfg": recipe.cfg,
                "latent_size": recipe.latent_size, "scaling_factor": model.spec.decoder.scaling_factor,
                "scheduler": scheduler_config(model.spec.scheduler)}
    manifest = new_manifest(recipe.to_dict(), model.source, model.spec.name, pipeline,
                            recipe.format, recipe.backend)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        bar = tqdm(total=len(names) + 1, desc="export", unit="component")
        bar.set_postfix_str("reference pipeline run")
        reference = record_reference(model, recipe, full=needs_calibration)
        reference.save(tmp / REFERENCE_FILE)
        manifest["extra_files"].append(file_entry(tmp, tmp / REFERENCE_FILE, role="reference_io"))
        bar.update()
        for name in names:
            settings = recipe.component(name)
            start = time.perf_counter()
            bar.set_postfix_str(f"{name}: surgery")
            comp = build_component(model, name, recipe, surgery_passes(recipe, settings))
            setattr(model, name, None)  # comp holds the module now; the exporter may free it
            entry = exporter.export_component(
                comp, settings, recipe, tmp, reference,
                progress=lambda phase, n=name: bar.set_postfix_str(f"{n}: {phase}"))
            entry.update(interface=comp.interface, surgery=list(comp.passes),
                         inputs=[s.to_dict() for s in comp.inputs],
                         outputs=[s.to_dict() for s in comp.outputs],
                         export_seconds=round(time.perf_counter() - start, 2),
                         peak_rss_mb=round(peak_rss_mb(), 1),
                         parity_budget={"min_psnr_db": settings.min_psnr_db})
            entry.setdefault("files", [])
            manifest["components"][name] = entry
            del comp
            release_freed_memory()   # the next component's lowering peak starts lower
            bar.update()
        bar.close()
        if hasattr(exporter, "finish"):
            exporter.finish(model, recipe, tmp, manifest)
        write_manifest(tmp, manifest)
    return manifest


def cmd_export(args: argparse.Namespace) -> int:
    import dataclasses

    from mobile_sd.cli import load_model_arg

    recipe = load_recipe(args.recipe)
    if args.latent_size is not None:
        try:
            recipe = dataclasses.replace(recipe, latent_size=args.latent_size)
        except ValueError as exc:  # Recipe.__post_init__ validation
            raise RecipeError(f"--latent-size: {exc}") from exc
    if args.components:
        from mobile_sd.recipes import ComponentRecipe
        bad = sorted(set(args.components) - {"text_encoder", "unet", "decoder"})
        if bad:
            raise RecipeError(f"--components: unknown {bad}; valid: text_encoder, unet, decoder")
        comps = {n: dataclasses.replace(recipe.components.get(n, ComponentRecipe()),
                                        export=n in args.components)
                 for n in ("text_encoder", "unet", "decoder")}
        recipe = dataclasses.replace(recipe, components=comps)
    start = time.perf_counter()
    model = load_model_arg(args)
    try:
        with _sigterm_as_interrupt():
            manifest = run_export(recipe, model, args.out, overwrite=args.force)
    except KeyboardInterrupt:
        # atomic_output_dir already removed the temp folder; say so with exit code 2.
        raise ExportInterruptedError(f"export interrupted; nothing was written: {args.out} is "
                                     "as it was before. Run the command again") from None
    for name, comp in manifest["components"].items():
        size = sum(f["bytes"] for f in comp["files"]) / 2**20
        print(f"{name:13s} {size:9.1f} MB  {', '.join(f['path'] for f in comp['files'])}")
    for skip in manifest["skipped"]:
        print(f"skipped: {skip['step']}: {skip['reason']}")
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s, peak RSS "
          f"{peak_rss_mb() / 1024:.1f} GB (model: {model.source})")
    return 0


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Treat SIGTERM (``kill``, CI timeouts, ``make`` being stopped) like Ctrl-C while the
    export runs, so the temp folder is removed too; the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def register(sub) -> None:
    from mobile_sd.cli import _add_model_args

    p = sub.add_parser("export", help="export components per a recipe (Core ML, ExecuTorch, ONNX)")
    p.add_argument("--recipe", type=Path, required=True, help="export_recipes/*.yaml")
    _add_model_args(p)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--latent-size", type=int, default=None, help="override the recipe's latent size")
    p.add_argument("--components", nargs="+", default=None,
                   help="export only these components (text_encoder unet decoder)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_export, seed_weights=None)
