"""The image/latent size factor comes from the decoder's depth, as diffusers computes it."""
from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from mobile_sd.models.folder import load_model_folder
from mobile_sd.models.spec import DecoderSpec, load_spec



def test_shipped_specs_are_8x():
    for name in ("sd15", "snapfusion", "sd15-tiny", "snapfusion-tiny"):
        spec = load_spec(name)
        assert spec.decoder.vae_scale_factor == spec.vae_scale_factor == 8
        assert spec.image_size == spec.unet.sample_size * 8
    assert load_spec("sd15").image_size == 512


@pytest.mark.parametrize("channels, factor", [((8,), 1), ((8, 16), 2), ((8, 16, 16), 4),
                                              ((8, 8, 16, 16, 16), 16)])
def test_diffusers_vae_folder_of_other_depth(sd15_tiny_folder, tmp_path, channels, factor):
    """A user's folder whose AutoencoderKL has fewer/more blocks than SD's: the decoder makes
    images ``latent * 2 ** (blocks - 1)`` wide and the spec says so."""
    from diffusers import AutoencoderKL

    folder = tmp_path / "model"
    shutil.copytree(sd15_tiny_folder, folder)
    shutil.rmtree(folder / "vae")
    n = len(channels)
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=channels, down_block_types=["DownEncoderBlock2D"] * n,
                  up_block_types=["UpDecoderBlock2D"] * n, norm_num_groups=4,
                  layers_per_block=1, latent_channels=4).save_pretrained(folder / "vae")
    model = load_model_folder(folder)
    assert model.spec.decoder.vae_scale_factor == model.spec.vae_scale_factor == factor
    assert model.spec.image_size == 16 * factor
    with torch.no_grad():
        image = model.decoder(torch.randn(1, 4, 6, 6))
    assert image.shape == (1, 3, 6 * factor, 6 * factor)


def test_factor_is_not_a_field():
    """A property, so spec YAML / decoder configs cannot contradict the decoder's depth."""
    assert "vae_scale_factor" not in {f.name for f in dataclasses.fields(DecoderSpec)}
