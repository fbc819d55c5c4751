"""``onnx-snapfusion`` writes the diffusers/optimum ONNX folder: files, configs, I/O names,
dynamic axes, and ``mobile-sd parity`` still passes on it.

optimum itself cannot be imported here (it needs transformers<4.58);
``benchmarks/optimum_pipeline.py`` runs its real pipeline on this layout in its own venv.
Micro spec (one downsampling stage), latent 8: the export takes seconds.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from mobile_sd.errors import RecipeError
from tests.helpers.paths import DATA, RECIPES

MICRO = str(DATA / "parity-micro.yaml")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models on a shared 2-core machine: one thread."""


@pytest.fixture(scope="module")
def optimum_export(tmp_path_factory):
    from mobile_sd.export.engine import run_export
    from mobile_sd.models.zoo import build_model
    from mobile_sd.recipes import load_recipe

    recipe = dataclasses.replace(load_recipe(RECIPES / "onnx-snapfusion.yaml"), latent_size=8)
    out = tmp_path_factory.mktemp("optimum") / "onnx"
    manifest = run_export(recipe, build_model(MICRO), out)
    return out, manifest


def _json(path):
    return json.loads(path.read_text())


def test_folder_is_the_diffusers_onnx_layout(optimum_export):
    from mobile_sd.manifest import load_manifest, verify_files

    out, manifest = optimum_export
    for part in ("text_encoder", "unet", "vae_decoder"):
        assert (out / part / "model.onnx").is_file() and (out / part / "config.json").is_file()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / "tokenizer" / name).is_file()
    index = _json(out / "model_index.json")
    assert index["_class_name"] == "ORTStableDiffusionPipeline"
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert {"unet", "text_encoder", "vae_decoder"} <= set(index)
    # every file written is in the manifest with its sha256 (verify_files rehashes them)
    listed = {f.path for c in manifest.components.values() for f in c.files}
    listed |= {f.path for f in manifest.extra_files}
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert written - listed == {"manifest.json"}
    verify_files(out, load_manifest(out))


def test_configs_carry_what_optimum_reads(optimum_export):
    from mobile_sd.models.zoo import build_model

    out, _ = optimum_export
    spec = build_model(MICRO).spec
    unet = _json(out / "unet" / "config.json")
    assert unet["in_channels"] == 4 and unet["sample_size"] == 8
    assert unet["time_cond_proj_dim"] is None           # else the pipeline drops CFG
    vae = _json(out / "vae_decoder" / "config.json")
    assert vae["scaling_factor"] == spec.decoder.scaling_factor   # missing: silently 2^(n-1)
    assert 2 ** (len(vae["block_out_channels"]) - 1) == spec.decoder.vae_scale_factor
    assert _json(out / "text_encoder" / "config.json")["num_hidden_layers"] == 1
    assert _json(out / "tokenizer" / "tokenizer_config.json")["model_max_length"] == 77
    scheduler = _json(out / "scheduler" / "scheduler_config.json")
    assert (scheduler["prediction_type"], scheduler["timestep_spacing"]) == (
        "v_prediction", "trailing")


def _session(path):
    from mobile_sd.runtimes.ort import cpu_session

    return cpu_session(path, num_threads=1)


def test_io_names_scalar_timestep_and_dynamic_axes(optimum_export):
    out, _ = optimum_export
    unet = _session(out / "unet" / "model.onnx")
    assert [(i.name, len(i.shape)) for i in unet.get_inputs()] == [
        ("sample", 4), ("timestep", 0), ("encoder_hidden_states", 3)]
    assert [o.name for o in unet.get_outputs()] == ["out_sample"]
    decoder = _session(out / "vae_decoder" / "model.onnx")
    assert [i.name for i in decoder.get_inputs()] == ["latent_sample"]
    assert [o.name for o in decoder.get_outputs()] == ["sample"]
    text = _session(out / "text_encoder" / "model.onnx")
    assert [i.name for i in text.get_inputs()] == ["input_ids"]
    static = lambda s: [d for d in s.get_inputs()[0].shape if isinstance(d, int)]  # noqa: E731
    assert static(unet) == [4] and static(decoder) == [4] and static(text) == [77]


def test_other_batch_and_size_match_eager(optimum_export):
    """Shapes the export never saw (batch 1 and 4, latent 16): the axes really are dynamic."""
    from mobile_sd.models.zoo import build_model
    from mobile_sd.parity.eager import at_latent_size

    out, _ = optimum_export
    model = at_latent_size(build_model(MICRO), 16)
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 4):
        sample, context = torch.randn(batch, 4, 16, 16, generator=gen), torch.randn(
            batch, 77, 16, generator=gen)
        timestep = torch.tensor(501.0)
        got = _session(out / "unet" / "model.onnx").run(None, {
            "sample": sample.numpy(), "timestep": timestep.numpy(),
            "encoder_hidden_states": context.numpy()})[0]
        with torch.no_grad():
            want = model.unet(sample, timestep.expand(batch), context)
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
    latents = torch.randn(2, 4, 16, 16, generator=gen)
    got = _session(out / "vae_decoder" / "model.onnx").run(None, {"latent_sample": latents.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model.decoder(latents).numpy(), atol=1e-4)


def test_parity_passes_on_the_optimum_folder(optimum_export, tmp_path):
    from mobile_sd.models.zoo import build_model
    from mobile_sd.parity.run import ParityOptions, run_parity

    out, _ = optimum_export
    report = run_parity(out, build_model(MICRO), ParityOptions(prompts=["a cat"], random_inputs=2),
                        out_dir=tmp_path / "parity")
    assert {n: c["status"] for n, c in report["components"].items()} == {
        "text_encoder": "pass", "unet": "pass", "decoder": "pass"}
    assert report["e2e"]["status"] == "pass" and report["e2e"]["min_psnr_db"] >= 60


def test_optimum_layout_needs_batch2_cfg(tmp_path):
    from mobile_sd.recipes import load_recipe

    path = tmp_path / "bad.yaml"
    path.write_text((RECIPES / "onnx-snapfusion.yaml").read_text().replace(
        "cfg: batch2", "cfg: folded"))
    with pytest.raises(RecipeError, match="interface 'optimum' .* needs format 'onnx' and cfg"):
        load_recipe(path)
