"""Weights as published folders store them: transformers 4.x CLIP names, fp16/bf16 tensors,
``*.fp16.safetensors`` variants (single and sharded)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mobile_sd.errors import InvalidArgumentError, WeightsError
from mobile_sd.models.folder import load_model_folder
from mobile_sd.models.zoo import build_model

WEIGHTS = {"unet": "unet/diffusion_pytorch_model.safetensors",
           "text_encoder": "text_encoder/model.safetensors",
           "decoder": "vae_decoder/diffusion_pytorch_model.safetensors"}


@pytest.fixture
def folder(tiny_folder, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_folder, dst)
    return dst


def _rewrite(path, fn, out=None):
    save_file(fn(load_file(str(path))), str(out or path))


def _half(dtype):
    return lambda tensors: {k: v.to(dtype) if v.is_floating_point() else v
                            for k, v in tensors.items()}


def _as_variant(folder, variant="fp16", dtype=torch.float16, keep_plain=True):
    for rel in WEIGHTS.values():
        plain = folder / rel
        _rewrite(plain, _half(dtype), plain.with_name(plain.name.replace(
            ".safetensors", f".{variant}.safetensors")))
        if not keep_plain:
            plain.unlink()


def _same_params(module, reference, dtype=None):
    for (name, a), (_, b) in zip(module.state_dict().items(), reference.state_dict().items()):
        assert a.dtype == b.dtype, name
        want = b if dtype is None else b.to(dtype).to(b.dtype)
        assert torch.equal(a, want), name


def test_transformers4_clip_names_load(folder):
    """4.x CLIPTextModel saved ``text_model.``-prefixed tensors (and, before 4.31, the
    ``position_ids`` buffer); transformers 5 and mobile-sd both read them."""
    from transformers import CLIPTextModel

    path = folder / WEIGHTS["text_encoder"]
    _rewrite(path, lambda t: {**{f"text_model.{k}": v for k, v in t.items()},
                              "text_model.embeddings.position_ids": torch.arange(77)[None]})
    assert all(k.startswith("text_model.") for k in load_file(str(path)))
    ours = load_model_folder(folder).text_encoder
    _same_params(ours, build_model("snapfusion-tiny").text_encoder)
    theirs = CLIPTextModel.from_pretrained(folder / "text_encoder")
    _same_params(ours, theirs)
    # both prefixed and bare copies of one tensor: refused, naming it
    _rewrite(path, lambda t: {**t, "final_layer_norm.weight": t["text_model.final_layer_norm.weight"].clone()})
    with pytest.raises(WeightsError, match="'final_layer_norm.weight' is stored twice"):
        load_model_folder(folder)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_plain_files_upcast_and_generate(folder, dtype):
    from mobile_sd.pipeline.reference import generate

    for rel in WEIGHTS.values():
        _rewrite(folder / rel, _half(dtype))
    model = load_model_folder(folder)
    name = str(dtype).removeprefix("torch.")
    assert model.stored_dtypes == dict.fromkeys(WEIGHTS, name) and model.stored_dtype == name
    assert model.variants == dict.fromkeys(WEIGHTS)
    built = build_model("snapfusion-tiny")
    for part in WEIGHTS:  # fp32 modules holding the fp16-rounded weights exactly
        _same_params(getattr(model, part), getattr(built, part), dtype)
    result = generate(model, "a cat", steps=1, guidance=2.0, progress=False)
    assert np.isfinite(result.latents.numpy()).all()


def test_built_and_plain_fp32_folders_report_float32(folder):
    assert build_model("snapfusion-tiny").stored_dtype == "float32"
    model = load_model_folder(folder)
    assert model.stored_dtypes == dict.fromkeys(WEIGHTS, "float32")


def test_variant_is_chosen_explicitly_and_missing_variant_names_the_file(folder):
    _as_variant(folder)
    assert load_model_folder(folder).stored_dtype == "float32"  # plain preferred
    model = load_model_folder(folder, variant="fp16")
    assert model.stored_dtype == "float16" and set(model.variants.values()) == {"fp16"}
    assert all(p.dtype == torch.float32 for p in model.unet.parameters())
    with pytest.raises(WeightsError, match=r"unet/diffusion_pytorch_model\.bf16\.safetensors: "
                                           r"missing \(variant 'bf16' was requested.*holds plain "
                                           r"weights and variant 'fp16' \(drop --variant"):
        load_model_folder(folder, variant="bf16")
    with pytest.raises(InvalidArgumentError, match="variant '../fp16'"):
        load_model_folder(folder, variant="../fp16")


def test_folder_with_only_one_variant_loads_it_several_is_ambiguous(folder):
    _as_variant(folder, keep_plain=False)
    model = load_model_folder(folder)
    assert model.stored_dtype == "float16" and set(model.variants.values()) == {"fp16"}
    _rewrite(folder / "unet/diffusion_pytorch_model.fp16.safetensors", _half(torch.bfloat16),
             folder / "unet/diffusion_pytorch_model.bf16.safetensors")
    with pytest.raises(WeightsError, match=r"unet: no plain weights file but variants bf16, fp16; "
                                           r"choose one with variant= \(--variant bf16\)"):
        load_model_folder(folder)
    with pytest.raises(WeightsError, match=r"text_encoder/model\.bf16\.safetensors: missing"):
        load_model_folder(folder, variant="bf16")  # every weights folder needs the variant


@pytest.mark.parametrize("index_name", [
    "diffusion_pytorch_model.safetensors.index.fp16.json",   # diffusers' / transformers' naming
    "diffusion_pytorch_model.fp16.safetensors.index.json"])
def test_sharded_fp16_variant(folder, index_name):
    unet = folder / "unet"
    tensors = _half(torch.float16)(load_file(str(unet / "diffusion_pytorch_model.safetensors")))
    names = sorted(tensors)
    shards = {f"diffusion_pytorch_model.fp16-0000{i + 1}-of-00002.safetensors": names[i::2]
              for i in range(2)}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(unet / shard))
    (unet / index_name).write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}))
    _as_variant(folder)
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
        (unet / name).unlink()
    model = load_model_folder(folder, variant="fp16")
    assert model.stored_dtype == "float16"
    _same_params(model.unet, build_model("snapfusion-tiny").unet, torch.float16)
    model = load_model_folder(folder)  # plain files where there are some, else the one variant
    assert model.variants == {"unet": "fp16", "text_encoder": None, "decoder": None}
