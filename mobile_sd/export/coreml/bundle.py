"""Bundle-level files of a Core ML export: tokenizer files, lint summary, ``Resources/``.

Apple's StableDiffusion Swift package loads a *Resources* folder
(``StableDiffusionPipeline+Resources.swift``)::

    Resources/
      TextEncoder.mlmodelc   Unet.mlmodelc | UnetChunk1.mlmodelc + UnetChunk2.mlmodelc
      VAEDecoder.mlmodelc    vocab.json    merges.txt

``.mlmodelc`` folders are compiled with ``xcrun coremlcompiler compile`` (macOS with Xcode).
Elsewhere the step is recorded in ``manifest.skipped`` with the command to run on a Mac.

Example (not run by the tests: it needs real artifacts)::

    compile_resources(Path("artifacts/ios"), manifest)
    manifest.skipped[-1]["step"]
    # -> 'compile .mlmodelc into Resources/'
"""
from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

from mobile_sd.errors import ExportError
from mobile_sd.manifest import FileEntry

RESOURCES = "Resources"
COMPILE_STEP = "compile .mlmodelc into Resources/"
TOKENIZER_FILES = ("vocab.json", "merges.txt")


def write_vocab(model, out_dir: Path) -> list[Path]:
    """``vocab.json`` + ``merges.txt``: the model folder's own, else CLIP's (spec models)."""
    from mobile_sd.models.tokenizer import write_vocab_files

    folder = Path(model.source) / "tokenizer" if model.source else None
    if folder is not None and all((folder / f).is_file() for f in TOKENIZER_FILES):
        return [Path(shutil.copy2(folder / f, out_dir / f)) for f in TOKENIZER_FILES]
    return list(write_vocab_files(out_dir))


def write_lint_summary(path: Path, manifest: dict) -> Path | None:
    """Put a findings-per-rule table for every package on top of the per-package details."""
    from mobile_sd.export.coreml.ane.lint import HEADER_NOTE, RULES

    packages = {name: lint for comp in manifest.components.values()
                for name, lint in comp.details.get("ane_lint", {}).items()}
    if not packages:
        return None
    names = list(packages)
    lines = ["# ANE lint summary", "", f"{HEADER_NOTE}", "",
             "| rule | severity | source | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for rule in RULES:
        counts = [_cell(packages[n], rule.id) for n in names]
        lines.append(f"| {rule.id} | {rule.severity} | {rule.source} | " + " | ".join(counts) + " |")
    details = path.read_text() if path.exists() else ""
    path.write_text("\n".join(lines) + "\n\n" + details)
    return path


def _cell(lint: dict, rule: str) -> str:
    """``"208 (208 notes)"``: notes are weaker matches than the rule's severity."""
    count, notes = lint["counts"].get(rule, 0), lint.get("notes", {}).get(rule, 0)
    return f"{count} ({notes} notes)" if notes else str(count)


def compile_resources(out_dir: Path, manifest: dict) -> None:
    """Compile every package into ``Resources/`` (macOS + Xcode), else record why not."""
    xcrun = shutil.which("xcrun")
    if platform.system() != "Darwin" or xcrun is None:
        where = "this is Linux" if platform.system() == "Linux" else "xcrun is not on PATH"
        manifest.skipped.append({
            "step": COMPILE_STEP,
            "reason": f"needs macOS with Xcode (xcrun coremlcompiler); {where}. On a Mac run: "
                      "for p in *.mlpackage; do xcrun coremlcompiler compile $p Resources/; "
                      "done; cp vocab.json merges.txt Resources/"})
        return
    resources = out_dir / RESOURCES
    resources.mkdir(exist_ok=True)
    for package in sorted(out_dir.glob("*.mlpackage")):
        _compile(xcrun, package, resources)
        manifest.extra_files.append(FileEntry.of(out_dir, resources / f"{package.stem}.mlmodelc",
                                                  role="compiled"))
    for name in TOKENIZER_FILES:
        shutil.copy2(out_dir / name, resources / name)


def _compile(xcrun: str, package: Path, resources: Path) -> None:
    result = subprocess.run([xcrun, "coremlcompiler", "compile", str(package), str(resources)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise ExportError(f"xcrun coremlcompiler compile {package.name} failed (exit "
                          f"{result.returncode}): {result.stderr.strip()[-500:]}; check that "
                          "Xcode (not only the command line tools) is installed and selected")
