"""The shipped Android recipes make programs a stock Android app loads: ``Module.load(path)``.

The Android JNI builds ``Module(path, load_mode, etdump)``: no data file. So each ``.pte`` is
copied alone into an empty folder (nothing beside it to pick up) and loaded the same way,
``Runtime.get().load_program(path)`` without ``data_path``, then run against eager PyTorch.
Micro spec (every block type, one downsampling stage; the tiny spec's int8 export with its
sensitivity measurement takes over half an hour on this shared machine), latent 8;
calibration cut to one prompt x two steps.
"""
from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from mobile_sd.metrics import psnr_db
from tests.helpers.paths import DATA, RECIPES

ANDROID = ("android-snapfusion-xnnpack-fp32", "android-snapfusion-xnnpack-int8")
MICRO = str(DATA / "parity-micro.yaml")
FP32_MIN_PSNR_DB = 60.0   # fp32 XNNPACK vs eager: summation order only (measured > 100 dB)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models on a shared 2-core machine: one thread."""


def _export(name: str, out, bpte_cap: int | None = None):
    from mobile_sd.export.engine import run_export
    from mobile_sd.export.executorch import lower
    from mobile_sd.models.zoo import build_model
    from mobile_sd.recipes import load_recipe

    recipe = load_recipe(RECIPES / f"{name}.yaml")
    recipe = dataclasses.replace(recipe, latent_size=8, calibration=dataclasses.replace(
        recipe.calibration, prompts=recipe.calibration.prompts[:1], steps=2))
    model = build_model(MICRO)
    with pytest.MonkeyPatch.context() as patch:
        if bpte_cap is not None:   # the real cap (2 GiB) needs a full-size UNet to reach
            patch.setattr(lower, "BPTE_MAX_BYTES", bpte_cap)
        manifest = run_export(recipe, model, out)
    return manifest


@pytest.fixture(scope="module", params=ANDROID)
def android_export(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "android"
    # int8: a cap below every program stands in for a program over the real cap (the
    # full-size fp32 UNet); fp32 is bundled and verified at fp32 tolerances.
    cap = 1 if request.param.endswith("int8") else None
    return request.param, out, _export(request.param, out, cap)


def _weights_inside(pte) -> int:
    """Named-data entries (XNNPACK's weights) whose bytes are segments of this very file."""
    from executorch.exir._serialize._program import _flatbuffer_to_program, _get_extended_header

    data = pte.read_bytes()
    program = _flatbuffer_to_program(data[:_get_extended_header(data[:64]).program_size])
    named = program.named_data or []
    assert all(n.segment_index < len(program.segments) for n in named)
    return len(named)


def _load_like_android(pte, tmp_path):
    """Load ``pte`` alone in an empty folder, path only (no ``data_path``): as the JNI does."""
    from executorch.runtime import Runtime

    alone = tmp_path / "device" / pte.name
    alone.parent.mkdir(exist_ok=True)
    shutil.copyfile(pte, alone)
    return Runtime.get().load_program(str(alone)).load_method("forward")


def test_every_program_loads_path_only_and_matches_eager(android_export, tmp_path):
    from mobile_sd.models.zoo import build_model
    from mobile_sd.parity.eager import original_component

    name, out, manifest = android_export
    assert manifest.to_dict()["recipe"]["weights"] == "inline"
    assert not list(out.glob("*.ptd"))
    model = build_model(MICRO)
    for comp_name, entry in manifest.components.items():
        [pte] = [out / f.path for f in entry.files if f.format == "pte"]
        assert _weights_inside(pte) > 0, pte.name
        method = _load_like_android(pte, tmp_path)
        eager = original_component(model, manifest, comp_name)
        inputs = eager.example_inputs(seed=5)
        with torch.no_grad():
            want = eager.module(*inputs)
        got = method.execute(list(inputs))[0]
        budget = FP32_MIN_PSNR_DB if entry.precision == "fp32" else entry.min_psnr_db
        assert psnr_db(want, got) >= budget, (name, comp_name)


def test_bundles_only_programs_under_the_cap(android_export):
    from mobile_sd.export.executorch.lower import verify_bundled

    name, out, manifest = android_export
    bundled = sorted(out.glob("*.bpte"))
    skipped = [s for s in manifest.skipped if "(.bpte)" in s["step"]]
    if name.endswith("int8"):     # cap 1 byte: nothing fits, each one is recorded with why
        assert not bundled and len(skipped) == len(manifest.components)
        assert all("GiB" in s["reason"] and "weights: separate" in s["reason"] for s in skipped)
    else:
        assert len(bundled) == len(manifest.components) and not skipped
        assert all(verify_bundled(b, atol=1e-3, rtol=1e-3)["passed"] for b in bundled)


def test_bundle_limit_message_names_size_and_cap():
    from mobile_sd.export.executorch.lower import BPTE_MAX_BYTES, bundle_too_big

    cases = [((torch.zeros(1, 4, 8, 8),), torch.zeros(1, 4, 8, 8))]
    assert bundle_too_big(1 << 30, cases) is None
    reason = bundle_too_big(int(2.9 * 2**30), cases)
    assert "2.90 GiB" in reason and "2.00 GiB" in reason
    assert BPTE_MAX_BYTES == 2**31 - 1
