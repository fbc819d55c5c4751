"""The MIL runtime on real exports: every shipped iOS recipe (tiny models, latent 8) against the
eager fp32 modules, a corrupted palette located by the recorded values, fp16 overflow."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from mobile_sd.runtimes.coreml import MilModel, first_divergence, psnr
from tests.helpers.mil_exports import (corrupt_lut_entry, export, match_output, package_inputs,
                                      reference_call)

SHIPPED = [("ios-snapfusion-fast", "snapfusion-tiny"), ("ios-snapfusion-swift", "snapfusion-tiny"),
           ("ios-sd15-swift", "sd15-tiny")]
COMPONENTS = ["text_encoder", "unet", "decoder"]
PACKAGES = {"text_encoder": "TextEncoder", "unet": "Unet", "decoder": "VAEDecoder"}
# 6-bit palettes on random tiny weights measure 40-48 dB (UNet / text encoder), fp16 decoders
# ~68 dB typed; a wrong kernel (layout, padding, eps, LUT order) gives < 20 dB.
MIN_PSNR = {"text_encoder": 38.0, "unet": 35.0, "decoder": 38.0}


def _run(folder, component, mode, record=False):
    model = MilModel(folder / f"{PACKAGES[component]}.mlpackage", mode=mode)
    ins, outs = reference_call(folder, component)
    result = model.predict(package_inputs(model, ins), record=record)
    got = result[0] if record else result
    name = next(iter(outs))
    value = psnr(got[name], match_output(got[name], outs[name]))
    return (value, model, result) if record else value


@pytest.mark.parametrize("recipe,spec", SHIPPED, ids=[r for r, _ in SHIPPED])
def test_shipped_recipe_packages_match_eager_fp32(recipe, spec):
    folder = export(recipe, spec)
    for component in COMPONENTS:
        typed = _run(folder, component, "typed")
        wide = _run(folder, component, "fp32")
        print(f"{recipe} {component}: typed {typed:.1f} dB, fp32 {wide:.1f} dB")
        assert typed >= MIN_PSNR[component], (recipe, component, typed)
        assert wide >= MIN_PSNR[component], (recipe, component, wide)
        assert wide >= typed - 0.5, (recipe, component, typed, wide)   # fp16 only loses


def test_fp32_export_matches_eager_to_conversion_error():
    """No fp16, no palette: only the conversion (and this interpreter) can differ from eager.
    Measured 134-140 dB (summation order); gelu's tanh approximation instead of erf would give
    ~105 dB on the UNet, a wrong layer_norm epsilon ~60 dB."""
    folder = export("test-ios-fp32")
    for component in COMPONENTS:
        for mode in ("typed", "fp32"):
            value = _run(folder, component, mode)
            print(f"fp32 export {component} {mode}: {value:.1f} dB")
            assert value > 115.0, (component, mode, value)


def test_corrupted_palette_lowers_psnr_and_is_located(tmp_path):
    folder = export("ios-snapfusion-fast")
    bad = tmp_path / "Unet.mlpackage"
    shutil.copytree(folder / "Unet.mlpackage", bad)
    for extra in ("manifest.json", "reference_io.safetensors"):
        shutil.copy(folder / extra, tmp_path / extra)
    weight = corrupt_lut_entry(bad, "down_blocks_1_resnets_0_conv1_weight_to_fp16_palettized")

    good_psnr, good_model, (_, good_rec) = _run(folder, "unet", "typed", record=True)
    bad_psnr, bad_model, (_, bad_rec) = _run(tmp_path, "unet", "typed", record=True)
    print(f"palette corruption: UNet {good_psnr:.1f} dB -> {bad_psnr:.1f} dB")
    assert bad_psnr < good_psnr - 10.0, (good_psnr, bad_psnr)
    found = first_divergence(bad_rec, good_rec, bad_model.ops(), min_psnr_db=60.0)
    assert found is not None
    info, var = found
    assert info.op_type == "conv" and weight in info.weights, info
    assert "down_blocks_1_resnets_0_conv1" in info.hint
    print(f"first divergence: {info.name} ({info.op_type}, {info.hint})")
    # everything before it is bit-identical
    for earlier in bad_model.ops()[:bad_model.ops().index(info)]:
        for name in earlier.outputs:
            assert torch.equal(bad_rec[name], good_rec[name]), name


class Attention(torch.nn.Module):
    """Scores q.k reach ~1e5 for inputs scaled by 40: past fp16's 65504."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.q = torch.nn.Parameter(torch.randn(16, 16, generator=g))
        self.k = torch.nn.Parameter(torch.randn(16, 16, generator=g))

    def forward(self, x):
        q, k = x @ self.q, x @ self.k
        scores = q @ k.transpose(-1, -2)
        return torch.softmax(scores, dim=-1) @ x


def test_fp16_overflow_shows_in_typed_mode_only(tmp_path):
    import coremltools as ct

    module = Attention().eval()
    x = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(1)) * 40
    exported = torch.export.export(module, (x,)).run_decompositions({})
    mlmodel = ct.convert(exported, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
                         compute_precision=ct.precision.FLOAT16,
                         inputs=[ct.TensorType(name="x", shape=x.shape, dtype=np.float32)],
                         outputs=[ct.TensorType(name="y", dtype=np.float32)])
    path = tmp_path / "Attention.mlpackage"
    mlmodel.save(str(path))
    with torch.no_grad():
        eager = module(x).numpy()
    typed_model, wide_model = MilModel(path, mode="typed"), MilModel(path, mode="fp32")
    typed, rec = typed_model.predict({"x": x.numpy()}, record=True)
    wide = wide_model.predict({"x": x.numpy()})
    assert psnr(wide["y"], eager) > 40.0
    bad = typed["y"]
    assert (not np.isfinite(bad).all()) or psnr(bad, eager) < 20.0
    first_inf = next(info for info in typed_model.ops()
                     if any(not torch.isfinite(rec[n]).all() for n in info.outputs))
    assert first_inf.op_type in ("matmul", "einsum", "linear"), first_inf
    # its inputs are finite: the overflow happens in that op
    assert first_inf.inputs and all(torch.isfinite(rec[n]).all() for n in first_inf.inputs)


def test_typed_mode_skipping_rounding_of_moves_is_exact():
    """Data-movement ops on fp16 values skip the rounding: same bits as rounding every op."""
    from mobile_sd.runtimes.coreml import run_prepared

    folder = export("ios-snapfusion-fast")
    model = MilModel(folder / "Unet.mlpackage", mode="typed")
    ins = package_inputs(model, reference_call(folder, "unet")[0])
    prep = model._prepared
    skipped = [s for s in prep.steps if not s.rounds]
    assert len(skipped) > 100
    fast, fast_rec = run_prepared(prep, ins, record=True)
    for step in skipped:
        step.rounds = True
    try:
        full, full_rec = run_prepared(prep, ins, record=True)
    finally:
        for step in skipped:
            step.rounds = False
    assert fast_rec.keys() == full_rec.keys()
    assert all(torch.equal(fast_rec[k], full_rec[k]) for k in fast_rec)


def test_activations_are_freed_after_their_last_reader_without_changing_outputs():
    """A full-size UNet call must not hold every intermediate (GBs): each activation var is
    dropped once, right after the last op that reads it; program outputs never are."""
    from mobile_sd.runtimes.coreml import run_prepared

    folder = export("ios-snapfusion-fast")
    model = MilModel(folder / "Unet.mlpackage", mode="typed")
    prep = model._prepared
    freed = [name for dead in prep.frees for name in dead]
    assert len(freed) == len(set(freed)) > 100
    assert not set(freed) & set(prep.output_names)
    for i, dead in enumerate(prep.frees):
        for name in dead:
            readers = [j for j, s in enumerate(prep.steps)
                       if any(name in (ref if isinstance(ref, list) else [ref])
                              for _, ref in s.inputs)]
            assert readers[-1] == i, name
    ins = package_inputs(model, reference_call(folder, "unet")[0])
    freeing = run_prepared(prep, ins)
    keep_all, prep.frees = prep.frees, [[] for _ in prep.steps]
    try:
        holding = run_prepared(prep, ins)
    finally:
        prep.frees = keep_all
    assert all(torch.equal(freeing[k], holding[k]) for k in holding)


def test_typed_mode_stores_fp16_consts_as_fp16_and_widens_them_exactly():
    """Typed mode keeps fp16 weights in fp16 between calls (half of fp32's memory); ops read
    them widened, so the outputs equal those of consts held in fp32."""
    from mobile_sd.runtimes.coreml import run_prepared

    folder = export("ios-snapfusion-fast")
    typed = MilModel(folder / "Unet.mlpackage", mode="typed")
    wide = MilModel(folder / "Unet.mlpackage", mode="fp32")
    floats = {k: v for k, v in typed._prepared.consts.items()
              if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() > 1000}
    big = {k: v for k, v in floats.items() if v.dtype == torch.float16}
    # the weights (fp16 vars) are stored fp16; what stays fp32 is typed fp32 by the program
    assert big and sum(v.numel() for v in big.values()) >= 0.9 * sum(
        v.numel() for v in floats.values())
    assert all(wide._prepared.consts[k].dtype == torch.float32 for k in big)
    ins = package_inputs(typed, reference_call(folder, "unet")[0])
    stored = run_prepared(typed._prepared, ins)
    half = dict(typed._prepared.consts)
    typed._prepared.consts.update({k: v.float() for k, v in big.items()})
    try:
        widened_up_front = run_prepared(typed._prepared, ins)
    finally:
        typed._prepared.consts.update(half)
    assert all(torch.equal(stored[k], widened_up_front[k]) for k in stored)
