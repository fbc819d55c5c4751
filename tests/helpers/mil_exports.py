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
    """The export folder of ``recipe`` (a shipped recipe name, or ``test-ios-fp32``)."""
    if recipe == "test-ios-fp32":
        text = FP32_VARIANT
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
