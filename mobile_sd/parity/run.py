"""``run_parity``: every component of an export folder, then end to end, into one report.

Order: manifest and sha256 checks (errors stop here), open each component on its runtime
(I/O checked against the manifest; skips recorded with their reason), record the fp32
reference pipeline once (only if something can run), compare each component in two tiers
(locating the divergence when one fails), run the pipeline with the artifact's components,
write the report.
"""
from __future__ import annotations

import functools
import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mobile_sd.errors import ParityError
from mobile_sd.runtimes.component import ArtifactRunError
from mobile_sd.recipes import DEFAULT_PROMPTS


@dataclass
class ParityOptions:
    """What to run. ``prompts``: real pipeline inputs and end-to-end images."""
    prompts: Sequence[str] = DEFAULT_PROMPTS[:2]
    seed: int = 0
    random_inputs: int = 2
    components: Sequence[str] | None = None   # default: every component in the manifest
    e2e: bool = True
    locate: bool = True
    num_threads: int | None = None
    progress: bool = False
    # Core ML off macOS: "typed" (fp16 vars stay fp16, as shipped) or "fp32" (widened).
    coreml_mode: str = "typed"
    # Swift-app bundles (pipeline.swift_app in the manifest): emulate the app on the bundle.
    swift_app: bool = True


def _open_all(folder: Path, manifest, names, options: ParityOptions):
    from mobile_sd.runtimes.component import RuntimeSkip, open_component

    runners, entries = {}, {}
    for name in names:
        comp = manifest.components[name]
        entries[name] = {"files": [f.to_dict() for f in comp.files], "status": "skip",
                         "precision": _precision(manifest, name)}
        try:
            runners[name] = open_component(folder, manifest, name, options.num_threads,
                                           options.coreml_mode)
            entries[name]["runtime"] = runners[name].runtime
        except RuntimeSkip as skip:
            entries[name]["reason"] = skip.reason
    return runners, entries


def _precision(manifest, name: str) -> str:
    from mobile_sd.parity.eager import component_precision

    return component_precision(manifest, name)


def _check_one(folder, manifest, name, runner, model, recorder, options) -> dict:
    from mobile_sd.parity import eager
    from mobile_sd.parity.check import Budget, check_component, make_samples
    from mobile_sd.parity.locate import locate

    original = eager.original_component(model, manifest, name)
    # The surgery copy costs a full copy of the module (3.4 GB for a full-size UNet): built
    # only when a lowering reference or the locator needs it (Core ML needs it only to locate).
    surgery = functools.cache(lambda: eager.surgery_component(model, manifest, name))
    lowering, reason = eager.lowering_reference(surgery, _precision(manifest, name),
                                                manifest.format)
    samples = make_samples(original, recorder, options.random_inputs, options.seed)
    eager.expected_as_exported(original, samples)

    def where(sample, gate):
        return locate(folder, manifest, name, runner, surgery(), sample, gate)
    return check_component(runner, original, lowering, reason, samples,
                           Budget.from_manifest(manifest, name),
                           where if options.locate else None)


def run_parity(folder: str | Path, model, options: ParityOptions | None = None,
               out_dir: str | Path | None = None) -> dict:
    """Check the export in ``folder`` against ``model`` (a :class:`~mobile_sd.models.zoo.Model`,
    fp32) and write the report into ``out_dir``. Returns the report dict.

    Example (not run by the tests: it needs real artifacts)::

        report = run_parity("artifacts/android", build_model("snapfusion"))
        report["summary"]["status"]
        # -> 'pass'
    """
    from mobile_sd.manifest import load_manifest, verify_files
    from mobile_sd.parity import eager
    from mobile_sd.parity.report import new_report, summarize, write_report

    options = options or ParityOptions()
    folder = Path(folder)
    manifest = load_manifest(folder)
    verify_files(folder, manifest)
    eager.check_model_matches(model, manifest)
    pipe = manifest.pipeline
    model = eager.at_latent_size(model, int(pipe.get("latent_size", model.spec.unet.sample_size)))
    names = _select(manifest, options.components)
    settings = {"prompts": list(options.prompts), "seed": options.seed,
                "random_inputs": options.random_inputs, "steps": pipe.get("steps"),
                "guidance": pipe.get("guidance"), "latent_size": pipe.get("latent_size"),
                "coreml_mode": options.coreml_mode}
    report = new_report(folder, manifest, model, settings)
    runners, entries = _open_all(folder, manifest, names, options)
    report["components"] = entries
    recorder = images = None
    if runners:
        recorder, images = eager.record_pipeline(model, manifest, options.prompts, options.seed,
                                                 options.progress)
    for name, runner in list(runners.items()):
        try:
            entries[name].update(_check_one(folder, manifest, name, runner, model, recorder,
                                            options))
        except ArtifactRunError as exc:  # an artifact that crashes its runtime fails
            entries[name].update(status="fail", reason=str(exc))
            runners.pop(name)
        gc.collect()  # free this component's eager copies before the next one
    out = Path(out_dir) if out_dir is not None else default_out_dir(folder)
    report["e2e"] = _e2e(runners, entries, model, manifest, options, images, out, report)
    if options.swift_app and "swift_app" in pipe and options.e2e:
        report["swift_app"] = _swift_app(folder, model, manifest, options, _mil_models(runners))
    summarize(report)
    write_report(report, out)
    return report


def _mil_models(runners) -> dict:
    """Package file name -> the MIL model a component runner already holds (for the app)."""
    return {f.path.name: f.model for r in runners.values() for f in r.files
            if getattr(f, "engine", None) == "mil"}


def _swift_app(folder: Path, model, manifest, options: ParityOptions, opened: dict) -> dict:
    """Apple's Swift app emulated on the bundle's own files (MIL runtime), against the fp32
    pipeline with the app's scheduler; gated like end to end."""
    from mobile_sd.parity.check import Budget
    from mobile_sd.parity.swift_app import check_bundle

    gate = Budget.from_manifest(manifest).e2e_min_psnr_db
    rows = []
    for i, prompt in enumerate(options.prompts):
        try:
            row = check_bundle(folder, model, prompt, options.seed + i, options.coreml_mode,
                               opened)
        except Exception as exc:  # noqa: BLE001 - a package that crashes the app fails it
            return {"status": "fail", "gate_min_psnr_db": gate,
                    "reason": f"{type(exc).__name__}: {str(exc).strip()[:300]}"}
        row.pop("_images")
        rows.append(row)
    worst_psnr = min(r["psnr_db"] for r in rows)
    return {"status": "pass" if worst_psnr >= gate else "fail", "gate_min_psnr_db": gate,
            "min_psnr_db": worst_psnr, "min_ssim": min(r["ssim"] for r in rows),
            "settings": manifest.pipeline["swift_app"], "prompts": rows}


def default_out_dir(folder: Path) -> Path:
    """``<folder>.parity`` beside the export: the report never changes the artifact folder."""
    folder = Path(folder).absolute()
    return folder.with_name(folder.name + ".parity")


def _select(manifest, wanted) -> list[str]:
    names = list(manifest.components)
    if wanted:
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise ParityError(f"--components: {unknown} not in this export; it has {names}")
        names = [n for n in names if n in wanted]
    return names


def _e2e(runners, entries, model, manifest, options, images, out: Path, report) -> dict:
    from mobile_sd.parity.check import Budget
    from mobile_sd.parity.e2e import image_grid, run_e2e
    from mobile_sd.parity.report import shown

    if not options.e2e:
        return {"status": "skip", "reason": "disabled (--no-e2e)"}
    crashed = [n for n, e in entries.items() if e["status"] == "fail" and n not in runners]
    if crashed:
        return {"status": "skip", "reason": f"{', '.join(crashed)} crashed on its runtime"}
    skipped = [n for n, e in entries.items() if e["status"] == "skip"]
    if skipped:
        return {"status": "skip", "reason": f"{', '.join(skipped)} cannot run on this host: "
                f"{entries[skipped[0]].get('reason')}"}
    if not runners:
        return {"status": "skip", "reason": "no component selected"}
    gate = Budget.from_manifest(manifest).e2e_min_psnr_db
    try:
        result = run_e2e(runners, model, manifest, options.prompts, images, gate, options.seed)
    except ArtifactRunError as exc:
        return {"status": "fail", "gate_min_psnr_db": gate, "reason": str(exc)}
    label = f"{manifest.format}/{manifest.backend}"
    grid = image_grid(images, {label: result.pop("_images")}, out / "parity_grid.png")
    report["files"]["grid"] = shown(grid)
    return result
