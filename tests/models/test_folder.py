"""Model folders: bit-identical round trip, diffusers/transformers readability, bad folders."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from mobile_sd.errors import ModelFolderError, TensorMismatchError, WeightsError
from mobile_sd.models.folder import load_model_folder
from mobile_sd.models.zoo import build_model


def _assert_identical(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("name", ["snapfusion-tiny", "sd15-tiny"])
def test_round_trip_is_bit_identical(name, tiny_folder, sd15_tiny_folder):
    folder = tiny_folder if name == "snapfusion-tiny" else sd15_tiny_folder
    built = build_model(name)
    loaded = load_model_folder(folder)
    for part in ("unet", "text_encoder", "decoder"):
        _assert_identical(getattr(built, part), getattr(loaded, part))
    assert loaded.spec.unet == built.spec.unet
    assert loaded.spec.decoder.block_out_channels == built.spec.decoder.block_out_channels
    assert loaded.spec.scheduler == built.spec.scheduler
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_mobile_sd"]["spec"] == name


def test_standard_parts_load_with_diffusers_and_transformers(sd15_tiny_folder, tiny_folder):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    ours = load_model_folder(sd15_tiny_folder)
    unet = UNet2DConditionModel.from_pretrained(sd15_tiny_folder / "unet")
    _assert_identical(unet, ours.unet)
    vae = AutoencoderKL.from_pretrained(sd15_tiny_folder / "vae")
    _assert_identical(torch.nn.ModuleDict({"decoder": vae.decoder, "post_quant_conv": vae.post_quant_conv}),
                      ours.decoder)
    for folder in (sd15_tiny_folder, tiny_folder):
        clip = CLIPTextModel.from_pretrained(folder / "text_encoder")
        _assert_identical(clip, load_model_folder(folder).text_encoder)
        tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
        sched = DDIMScheduler.from_pretrained(folder / "scheduler")
        assert sched.config.prediction_type in ("epsilon", "v_prediction")


def _copy(folder, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    return dst


def test_missing_path(tmp_path):
    with pytest.raises(ModelFolderError, match="no such model folder"):
        load_model_folder(tmp_path / "does-not-exist")


def test_missing_component_folder(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(ModelFolderError, match="missing component folder text_encoder/"):
        load_model_folder(folder)


def test_missing_weights_file(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"unet: no weights file; expected one of"):
        load_model_folder(folder)


def test_truncated_weights_file(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    path = folder / "vae_decoder" / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"diffusion_pytorch_model.safetensors: cannot read "
                                           r"safetensors file .* truncated or corrupt"):
        load_model_folder(folder)


def test_pickle_only_weights_refused_and_never_unpickled(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    # A pickle whose unpickling would create a marker file: it must never run.
    marker = tmp_path / "unpickled"
    import pickle

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(WeightsError, match=r"only pickle weights \(diffusion_pytorch_model.bin\)"
                                           r".*never unpickles.*save_file"):
        load_model_folder(folder)
    assert not marker.exists()


def test_tensor_shape_mismatch_names_tensor_and_shapes(tiny_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(tiny_folder, tmp_path)
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    tensors["conv_in.weight"] = torch.zeros(16, 4, 5, 5)
    save_file(tensors, str(path))
    with pytest.raises(TensorMismatchError, match=r"tensor 'conv_in.weight' has shape "
                                                  r"\(16, 4, 5, 5\) in the file but the config "
                                                  r"builds \(16, 4, 3, 3\)"):
        load_model_folder(folder)


def test_tensor_name_mismatch_is_named(tiny_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(tiny_folder, tmp_path)
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    tensors["conv_out.kernel"] = tensors.pop("conv_out.weight")
    save_file(tensors, str(path))
    with pytest.raises(TensorMismatchError, match=r"unexpected tensor\(s\) 'conv_out.kernel'; "
                                                  r"missing tensor\(s\) 'conv_out.weight'"):
        load_model_folder(folder)


def test_init_refuses_non_empty_output_without_force(tmp_path, cli):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, err = cli("init", "--spec", "snapfusion-tiny", "--out", out)
    assert code == 2 and "already exists and is not empty; pass --force" in err
    assert (out / "keep.txt").exists()
