"""Tiny Core ML exports (snapfusion-tiny / sd15-tiny, latent 8) for the MIL runtime tests.

Each folder is made by the real command line (``python -m mobile_sd.cli export --recipe R``)
and cached across test sessions under ``$MOBILE_SD_MIL_TEST_CACHE`` (default: the system temp
dir), keyed by the recipe text and the sources under ``mobile_sd/`` (the layers above the export:
runtimes, parity, bench, report, excluded), so a change to the exporter or a recipe re-exports. A cold cache costs ~1.5-2 min per recipe.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "export_recipes"
PACKAGES = {"text_encoder": "TextEncoder", "unet": "Unet", "decoder": "VAEDecoder"}

# The recipe-wide defaults of the swift recipe at fp32 without compression: isolates conversion
# (and interpreter) error from fp16 and palettization loss.
FP32_VARIANT = """name: test-ios-fp32
description: "MIL runtime tests: Core ML fp32, split_einsum_v2, no compression"
format: coreml
backend: coreml
target: iOS17
precision: fp32
interface: swift
latent_size: 64
cfg: batch2
attention: split_einsum_v2
"""


# Packages that cannot change what an export writes (they sit above it or only run artifacts).
_NOT_EXPORT = frozenset({"runtimes", "parity", "bench", "report"})


# The Swift contract at fp16 without palettes (what "the fp16 bundle" means in the parity
# tests), its tiny UNet (~1.4 MB fp16) split into UnetChunk1 + UnetChunk2 like a full-size one.
FP16_CHUNKED_VARIANT = FP32_VARIANT.replace("test-ios-fp32", "test-ios-fp16-chunked").replace(
    "Core ML fp32", "Core ML fp16, UNet in two chunks").replace(
    "precision: fp32", "precision: fp16") + "unet_chunk_max_bytes: 1000000\n"
VARIANTS = {"test-ios-fp32": FP32_VARIANT, "test-ios-fp16-chunked": FP16_CHUNKED_VARIANT}


def _source_key(recipe_text: str, spec: str) -> str:
    h = hashlib.sha256(recipe_text.encode() + spec.encode())
    for path in sorted((ROOT / "mobile_sd").rglob("*")):
        if path.suffix in (".py", ".yaml") and not _NOT_EXPORT.intersection(path.parts):
            h.update(str(path.relative_to(ROOT)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("MOBILE_SD_MIL_TEST_CACHE",
                               Path(tempfile.gettempdir()) / "mobile-sd-mil-tests"))


def export(recipe: str, spec: str = "snapfusion-tiny") -> Path:
    """The export folder of ``recipe`` (a shipped recipe name, or one of ``VARIANTS``)."""
    if recipe in VARIANTS:
        text = VARIANTS[recipe]
    else:
        text = (RECIPES / f"{recipe}.yaml").read_text()
    out = cache_dir() / f"{recipe}-{spec}-{_source_key(text, spec)}"
    if (out / "manifest.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{recipe}-", dir=out.parent))
    recipe_file = work / f"{recipe}.yaml"
    recipe_file.write_text(text)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "mobile_sd", "export", "--recipe", str(recipe_file),
           "--spec", spec, "--latent-size", "8", "--out", str(work / "out"), "--force"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"export failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-4000:]}")
    try:
        (work / "out").rename(out)
    except OSError:          # another session won the race
        pass
    shutil.rmtree(work, ignore_errors=True)
    return out


def _adapt(x: np.ndarray, shape) -> np.ndarray:
    """Reference (B, S, C) hidden states -> the Swift interface's (B, C, 1, S)."""
    if x.shape == tuple(shape):
        return x
    if x.ndim == 3 and len(shape) == 4:
        return x.transpose(0, 2, 1)[:, :, None, :]
    raise ValueError(f"cannot map reference shape {x.shape} to {tuple(shape)}")


def reference_call(folder: Path, component: str):
    """The eager fp32 module's first recorded call of ``component`` (reference_io.safetensors,
    written by the export from the fp32 reference pipeline): (inputs, outputs)."""
    from safetensors import safe_open

    path = folder / "reference_io.safetensors"
    with safe_open(str(path), "np") as f:
        calls = json.loads(f.metadata()["mobile_sd_calls"])
        for i, call in enumerate(calls):
            if call["component"] == component:
                ins = {k: f.get_tensor(f"{i:05d}/in/{k}") for k in call["inputs"]}
                outs = {k: f.get_tensor(f"{i:05d}/out/{k}") for k in call["outputs"]}
                return ins, _as_exported(folder, component, ins, outs)
    raise KeyError(f"{path}: no recorded call of {component}")


def _as_exported(folder: Path, component: str, ins: dict, outs: dict) -> dict:
    """The recorded fp32 outputs as the export's contract has them: a UNet exported with
    ``v_to_epsilon`` outputs epsilon where the recorded (v-prediction) UNet gave v."""
    manifest = json.loads((folder / "manifest.json").read_text())
    if "v_to_epsilon" not in manifest["components"].get(component, {}).get("surgery", []):
        return outs
    from mobile_sd.surgery.v_to_epsilon import alphas_cumprod

    alpha_bar = alphas_cumprod().numpy()    # the tiny specs train on SD's schedule
    t = np.clip(np.round(ins["timestep"]), 0, len(alpha_bar) - 1).astype(np.int64)
    a = np.sqrt(alpha_bar[t]).reshape(-1, 1, 1, 1)
    s = np.sqrt(1 - alpha_bar[t]).reshape(-1, 1, 1, 1)
    return {k: (a * v + s * ins["sample"]).astype(np.float32) for k, v in outs.items()}


def package_inputs(model, ins: dict) -> dict:
    fin = model.package.function.inputs
    return {k: _adapt(v, fin[k].shape).astype(np.float32) for k, v in ins.items()}


def match_output(out: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return ref if ref.shape == out.shape else _adapt(ref, out.shape)


def copy_export(folder: Path, dest: Path) -> Path:
    """A private copy of a cached export folder (tests that break a copy leave the cache)."""
    shutil.copytree(folder, dest)
    return dest


def resign(folder: Path) -> None:
    """Record every listed file's current size and sha256 in ``manifest.json``: a package that
    was *written* wrong (not changed after export), so the runtime, not the hash check, meets it."""
    from mobile_sd.utils.files import sha256_file, size_bytes

    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    entries = [f for c in data["components"].values() for f in c["files"]]
    for entry in entries + data.get("extra_files", []):
        target = folder / entry["path"]
        if target.exists():
            entry.update(bytes=size_bytes(target), sha256=sha256_file(target))
    path.write_text(json.dumps(data, indent=2))


def lut_blob(package: Path, weight_suffix: str):
    """(weight name, weight file, LUT data offset, LUT values) of the palettized weight whose
    name ends with ``weight_suffix`` (module prefixes vary with wrapper passes)."""
    import struct

    import coremltools as ct

    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    ops = next(iter(spec.mlProgram.functions["main"].block_specializations.values())).operations
    lut_op = next(op for op in ops if op.type == "constexpr_lut_to_dense"
                  and op.outputs[0].name.endswith(weight_suffix))
    blob = lut_op.inputs["lut"].arguments[0].value.blobFileValue
    wfile = package / "Data" / "com.apple.CoreML" / "weights" / blob.fileName.split("/")[-1]
    with open(wfile, "rb") as fh:
        fh.seek(blob.offset)
        _, _, nbytes, data_offset = struct.unpack("<IIQQ", fh.read(24))
        fh.seek(data_offset)
        lut = np.frombuffer(fh.read(nbytes), np.float16).copy()
    return lut_op.outputs[0].name, wfile, data_offset, lut


def corrupt_lut_entry(package: Path, weight_suffix: str) -> str:
    """Give the most used palette entry of one palettized weight a wrong value (like a LUT
    written in the wrong order), in place. Returns the weight's name."""
    from mobile_sd.runtimes.coreml import load_package

    name, wfile, offset, lut = lut_blob(package, weight_suffix)
    lut_op = next(op for op in load_package(package).function.operations
                  if op.op_type == "constexpr_lut_to_dense" and op.outputs[0].name == name)
    entry = int(np.bincount(lut_op.indices.val.reshape(-1).astype(np.int64)).argmax())
    with open(wfile, "r+b") as fh:
        fh.seek(offset + 2 * entry)
        fh.write(np.float16(-4.0 * float(np.abs(lut).max())).tobytes())
    return name
