"""The PyTorch side of a parity run, rebuilt from what ``manifest.json`` records.

For each exported component two eager references exist:

* the **original**: the fp32 module with only the passes that change its I/O contract
  (``cfg_fold``), i.e. what the user trained, called the way the artifact is called;
* the **lowering reference**: the module with the export's whole surgery list and the same
  compression the export applied (fp16: ``.half()``), i.e. what the runtime should compute.
  For compressions that have no eager equivalent here (int8 PT2E, Core ML palettization) it is
  ``None`` with the reason.

Surgery rewrites modules in place, so the lowering reference is built from a deep copy.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Sequence

import torch

from mobile_sd.export.components import ExportComponent
from mobile_sd.errors import ParityError

# A tier that does not exist for a format (reported "n/a", not "skipped": nothing was left out).
NOT_APPLICABLE = "n/a:"

# Recipe fields that shape a component's I/O; the rest (compression...) is not needed here.
_RECIPE_KEYS = ("name", "format", "backend", "target", "precision", "interface", "latent_size",
                "cfg", "attention")


def manifest_recipe(manifest):
    """The export's recipe, as far as the I/O contract goes (validated like a recipe file)."""
    from mobile_sd.config import from_dict
    from mobile_sd.recipes import Recipe

    raw = manifest.recipe
    if not raw:
        raise ParityError("manifest.json has no 'recipe'; re-export with this mobile-sd version")
    data = {k: raw[k] for k in _RECIPE_KEYS if k in raw}
    data["latent_size"] = manifest.pipeline.get("latent_size", data.get("latent_size", 64))
    data["calibration"] = {"guidance": manifest.pipeline.get("guidance")}
    try:
        return from_dict(Recipe, data, where="manifest.json recipe", error=ParityError)
    except ValueError as exc:
        raise ParityError(f"manifest.json recipe is invalid: {exc}") from exc


def component_precision(manifest, name: str) -> str:
    """The precision the export used for ``name`` (per-component override or recipe-wide)."""
    entry = manifest.components.get(name)
    raw = manifest.recipe
    over = (raw.get("components") or {}).get(name) or {}
    return ((entry.precision if entry else None) or over.get("precision")
            or raw.get("precision") or "fp32")


def at_latent_size(model, latent_size: int):
    """``model`` with its spec's sample size set to the export's latent size (shared modules)."""
    from mobile_sd.models.spec import replace_unet

    if model.spec.unet.sample_size == latent_size:
        return model
    return dataclasses.replace(model, spec=replace_unet(model.spec, sample_size=latent_size))


def check_model_matches(model, manifest) -> None:
    """Refuse a reference model of another architecture than the one exported."""
    exported = manifest.model.get("spec")
    if exported and model.spec.name != exported:
        raise ParityError(f"the artifacts were exported from spec {exported!r} but the reference "
                          f"model is {model.spec.name!r} ({model.source}); pass --spec {exported} "
                          "or the --model folder they were exported from")


def _build(model, manifest, name: str, passes: Sequence[str],
           copy_module: bool) -> ExportComponent:
    from mobile_sd.export.engine import build_component

    module = getattr(model, name)
    own = dataclasses.replace(model, **{name: copy.deepcopy(module) if copy_module else module})
    comp = build_component(own, name, manifest_recipe(manifest), list(passes))
    comp.module.eval()
    return comp


def original_component(model, manifest, name: str) -> ExportComponent:
    """The fp32 original with the artifact's I/O contract (only I/O-changing passes applied)."""
    from mobile_sd.surgery import get_pass

    surgery = manifest.components[name].surgery
    # Wrapper passes (cfg_fold) leave the wrapped module untouched: no copy needed, which
    # saves a full copy of the UNet (3.4 GB at full size).
    return _build(model, manifest, name, [p for p in surgery if get_pass(p).returns_wrapper],
                  copy_module=False)


def surgery_component(model, manifest, name: str) -> ExportComponent:
    """The fp32 module with the export's whole surgery list (same module names as the export)."""
    return _build(model, manifest, name, manifest.components[name].surgery,
                  copy_module=True)  # surgery rewrites in place


def lowering_reference(surgery: Callable[[], ExportComponent], precision: str,
                       fmt: str) -> tuple[torch.nn.Module | None, str | None]:
    """(module, None), or (None, reason) when no eager model carries the export's compression.

    ``surgery()`` builds the :func:`surgery_component` (called only when a reference exists);
    fp16 wraps a copy of it.
    """
    if fmt == "coreml":
        # The MIL runtime's fp32-widened run of the same package is not a lowering reference:
        # against the as-typed run it measures fp16 storage loss (~45-60 dB on a UNet), a
        # precision choice, not a lowering bug, so a 60 dB gate would fail healthy exports.
        # Conversion error is what the fp32 tier plus the locator (typed vs widened, per op)
        # already expose; the widened run is reported separately (ParityOptions.coreml_mode).
        return None, (f"{NOT_APPLICABLE} Core ML palettization / fp16 compute has no eager "
                      "equivalent; the MIL runtime's fp32-widened run measures fp16 loss, not "
                      "lowering (tier 2 vs the fp32 original applies)")
    if precision == "fp32":
        return surgery().module, None
    if precision == "fp16":
        from mobile_sd.export.executorch.precision import HalfIO

        return HalfIO(surgery().module).eval(), None   # the wrapper the export uses (copies)
    return None, (f"precision {precision!r}: the quantized eager model (PT2E) is not kept with "
                  "the export, so only tier 2 (vs the fp32 original) applies")


def record_pipeline(model, manifest, prompts: Sequence[str], seed: int = 0,
                    progress: bool = False):
    """Run the fp32 reference pipeline for ``prompts`` (every step, both CFG branches) with the
    export's settings and record every component call. Returns ``(recorder, images)``."""
    from mobile_sd.pipeline.record import record_runs

    pipe = manifest.pipeline
    return record_runs(model, prompts, pipe.get("steps"),
                       pipe.get("guidance", model.spec.scheduler.default_guidance), seed, progress)


def expected_as_exported(original: ExportComponent, samples) -> None:
    """Recorded outputs are the trained UNet's (v for SnapFusion); a UNet exported with
    ``v_to_epsilon`` outputs epsilon: convert the recorded outputs in place, exactly as the
    wrapper does (``eps = a_t * v + s_t * x_t``), so the fp32 tier compares like with like."""
    from mobile_sd.surgery.v_to_epsilon import VToEpsilonUNet

    wrapper = next((m for m in original.module.modules() if isinstance(m, VToEpsilonUNet)), None)
    if wrapper is None:
        return
    for sample in samples:
        if sample.expected is None:
            continue
        x, t = sample.inputs[0], sample.inputs[1]
        idx = torch.clamp(torch.round(t.float().reshape(-1)), 0,
                          wrapper.num_train_timesteps - 1).long()
        shape = (-1,) + (1,) * (x.ndim - 1)
        a = wrapper.sqrt_alpha_bar[idx].reshape(shape)
        s = wrapper.sqrt_one_minus_alpha_bar[idx].reshape(shape)
        sample.expected = tuple(a * v.float() + s * x.float() for v in sample.expected)
