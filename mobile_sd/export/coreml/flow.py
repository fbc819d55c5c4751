"""The Core ML format of ``mobile-sd export``: one component at a time, then the bundle.

Per component (:func:`export_component`), each phase freeing what the next does not need::

    [mixed-bit plan]  measure per-layer sensitivity on the recorded reference inputs (UNet)
    convert           torch.export -> ct.convert (named fp32 I/O, fp16/fp32 compute)
    compress          the recipe's three-level config: fast k-means LUTs / int8 / int4
    save              <Package>.mlpackage (TextEncoder, Unet, VAEDecoder)
    chunk             UnetChunk1/2.mlpackage when the UNet's weights exceed the recipe's limit
    check             reload without a runtime: I/O vs the manifest, compression ops present
    lint              ANE lint per package -> manifest + ane_lint.md

Bundle (:func:`finish`): ``vocab.json`` / ``merges.txt`` (Swift ``BPETokenizer``), the
``ane_lint.md`` summary, and ``Resources/`` compiled with ``xcrun coremlcompiler`` on macOS
(recorded as skipped elsewhere).

Example (not run by the tests: it needs real artifacts)::

    entry = export_component(comp, recipe.component("unet"), recipe, tmp, reference)
    entry["files"][0]["path"], entry["compression"]["ops"]
    # -> ('Unet.mlpackage', 212)
"""
from __future__ import annotations

import gc
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from mobile_sd.export.components import ExportComponent
from mobile_sd.errors import RecipeError
from mobile_sd.export.coreml.convert import (PACKAGE_NAMES, convert_component, load_package,
                                        save_package)
from mobile_sd.manifest import FileEntry

LINT_FILE = "ane_lint.md"


def export_component(comp: ExportComponent, settings, recipe, out_dir: Path, reference,
                     progress: Callable[[str], None] | None = None) -> dict:
    """Export ``comp`` per ``settings`` (its resolved recipe); returns its manifest entry."""
    report = progress or (lambda phase: None)
    out_dir = Path(out_dir)
    entry: dict[str, Any] = {"package": PACKAGE_NAMES[comp.name], "target": recipe.target,
                             "precision": settings.precision}
    mlmodel = _convert_and_compress(comp, settings, recipe, reference, out_dir, entry, report)
    report("save")
    path = save_package(mlmodel, out_dir / f"{entry['package']}.mlpackage")
    del mlmodel  # holds the whole MIL program; the rest reads the saved package
    gc.collect()
    packages = _chunk_if_needed(comp, recipe, path, out_dir, entry, report)
    report("structure check")
    _check_packages(packages, entry.get("compression"))
    report("ANE lint")
    entry["ane_lint"] = _lint(packages, out_dir, settings.precision == "fp16")
    entry["op_histogram"] = _histograms(packages)
    entry["files"] = [FileEntry.of(out_dir, p, role=_role(comp.name, p), **io)
                      for p, io in packages]
    return entry


def _convert_and_compress(comp, settings, recipe, reference, out_dir: Path, entry: dict,
                          report):
    """The in-memory ``MLModel``: [mixed-bit plan], conversion, compression."""
    config, plan = settings.compression, None
    if comp.name == "unet" and recipe.options.mixed_bit is not None:
        from mobile_sd.export.coreml.mixed_bit import plan_mixed_bit

        report("mixed-bit sensitivity")
        plan, entry["mixed_bit"] = plan_mixed_bit(comp, config, recipe.options.mixed_bit, reference,
                                                  out_dir)
    mlmodel = convert_component(comp, recipe.target, settings.precision, report)
    comp.module = None  # the eager weights are not needed past conversion (see export/engine.py)
    gc.collect()
    if plan is not None:
        from mobile_sd.export.coreml.mixed_bit import apply_plan

        config = apply_plan(config, plan, fp16=settings.precision == "fp16")
    if config is None or not config.specs():   # all-null configs leave every op alone
        return mlmodel
    from mobile_sd.export.coreml.compress import compress_model

    report("compress")
    try:
        mlmodel, entry["compression"] = compress_model(mlmodel, config)
    except RecipeError as exc:  # e.g. an op_name the program does not have: say which model
        raise RecipeError(f"{entry['package']} ({comp.name}) compression: {exc}") from None
    return mlmodel


def _io(comp: ExportComponent) -> dict:
    return {"inputs": [s.to_dict() for s in comp.inputs],
            "outputs": [s.to_dict() for s in comp.outputs]}


def _role(component: str, path: Path) -> str:
    return "unet_chunk" if path.stem.startswith("UnetChunk") else component


def _chunk_if_needed(comp, recipe, path: Path, out_dir: Path, entry: dict, report):
    """``[(package, io)]``: the package itself, or its two chunks when it is over the limit."""
    from mobile_sd.export.coreml.chunk import bisect_package, needs_chunking

    if comp.name != "unet" or not needs_chunking(path, recipe.options.unet_chunk_max_bytes):
        return [(path, _io(comp))]
    report("chunk")
    chunks = bisect_package(path, out_dir, recipe.options.unet_chunk_max_bytes)
    entry["chunks"] = {"max_bytes": recipe.options.unet_chunk_max_bytes,
                       "weight_bytes": [c.weight_bytes for c in chunks],
                       "contract": "chunk 2 takes chunk 1's outputs plus the original inputs, "
                                   "by name"}
    return [(c.path, c.io()) for c in chunks]


def expected_compression(compression: dict | None) -> dict | None:
    """What :func:`coreml_inspect.check_structure` must find in each package (or chunk)."""
    if not compression:
        return None
    expected = {kind: 1 for kind, count in compression.get("ops_by_kind", {}).items() if count}
    bits = set(compression.get("lut_nbits", {}))
    if len(bits) == 1:
        expected["lut_nbits"] = int(next(iter(bits)))
    return expected or None


def _check_packages(packages, compression: dict | None) -> None:
    from mobile_sd.export.coreml.inspect import assert_structure

    for path, io in packages:
        assert_structure(load_package(path), io, expected_compression(compression))


def _lint(packages, out_dir: Path, fp16: bool) -> dict:
    """Lint each package: counts + first findings in the manifest, details in ane_lint.md."""
    from mobile_sd.export.coreml.ane.lint import lint_package

    summary = {}
    for path, _ in packages:
        lint = lint_package(path, expect_fp16=fp16)
        lint.model = path.name
        with open(out_dir / LINT_FILE, "a") as handle:
            handle.write(lint.to_markdown() + "\n")
        counts = {rule: n for rule, n in lint.counts().items() if n}
        notes = Counter(f.rule for f in lint.findings if f.severity == "note")
        summary[path.name] = {"counts": counts, "notes": dict(notes),
                              "findings": len(lint.findings),
                              "first": [f.to_dict() for f in _first_per_rule(lint.findings)],
                              "details": LINT_FILE}
    return summary


def _first_per_rule(findings, n: int = 3) -> list:
    kept, seen = [], {}
    for finding in findings:
        seen[finding.rule] = seen.get(finding.rule, 0) + 1
        if seen[finding.rule] <= n:
            kept.append(finding)
    return kept


def _histograms(packages) -> dict:
    from mobile_sd.export.coreml.inspect import op_histogram

    return {path.name: op_histogram(path) for path, _ in packages}


def finish(model, recipe, out_dir: Path, manifest: dict) -> None:
    """Bundle-level files: tokenizer vocabulary, lint summary, compiled ``Resources/``."""
    from mobile_sd.export.coreml.bundle import compile_resources, write_lint_summary, write_vocab

    out_dir = Path(out_dir)
    for path in write_vocab(model, out_dir):
        manifest.extra_files.append(FileEntry.of(out_dir, path, role="tokenizer"))
    lint = write_lint_summary(out_dir / LINT_FILE, manifest)
    if lint is not None:
        manifest.extra_files.append(FileEntry.of(out_dir, lint, role="ane_lint"))
    compile_resources(out_dir, manifest)


class CoreMLExporter:
    """``format: coreml`` in the export engine's registry."""
    format = "coreml"
    export_component = staticmethod(export_component)
    finish = staticmethod(finish)
