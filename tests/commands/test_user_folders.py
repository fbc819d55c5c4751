"""Folders users really have, end to end through the commands: an SD-style folder whose
weights exist only as ``*.fp16.safetensors`` variants, and one whose UNet is BK-SDM-style (no
mid block, one layer per stage), written with diffusers itself. Each goes through
``generate``, the iOS and Android exports and ``parity`` (tiny widths, latent 8)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.helpers.paths import RECIPES

RECIPE_FILES = {"ios": "ios-snapfusion-swift.yaml", "android": "android-snapfusion-xnnpack-fp32.yaml"}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread."""


def _fp16_variant_only(folder):
    """Every component re-saved in fp16 by diffusers / transformers themselves as the
    ``variant="fp16"`` files published SD-1.5 repositories ship, the plain files removed (a
    user who downloaded only the fp16 variant)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    for sub, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL),
                     ("text_encoder", CLIPTextModel)):
        model = cls.from_pretrained(folder / sub).half()
        shutil.rmtree(folder / sub)
        model.save_pretrained(folder / sub, variant="fp16")
    assert not list(folder.glob("*/*[!6].safetensors"))   # only *.fp16.safetensors left


def _bk_sdm_unet(folder):
    """The UNet replaced by a BK-SDM-Tiny-style one saved by diffusers' own save_pretrained."""
    from diffusers import UNet2DConditionModel

    config = json.loads((folder / "unet" / "config.json").read_text())
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=[16, 32, 32], layers_per_block=1,
        down_block_types=["CrossAttnDownBlock2D"] * 3, mid_block_type=None,
        up_block_types=["CrossAttnUpBlock2D"] * 3, norm_num_groups=8, attention_head_dim=2,
        cross_attention_dim=config["cross_attention_dim"], sample_size=8)
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet")


@pytest.fixture(scope="module", params=["fp16-variant", "bk-sdm"])
def user_folder(request, tmp_path_factory):
    from mobile_sd.models.folder import write_model_folder
    from mobile_sd.models.zoo import build_model

    folder = tmp_path_factory.mktemp("user") / request.param
    write_model_folder(build_model("sd15-tiny"), folder)
    if request.param == "fp16-variant":
        _fp16_variant_only(folder)
        return folder, ["--variant", "fp16"]
    _bk_sdm_unet(folder)
    return folder, []


def test_generate(cli, user_folder, tmp_path):
    folder, extra = user_folder
    code, out, err = cli("generate", "--model", folder, *extra, "--prompt", "a cat", "--steps", 2,
                         "--out", tmp_path / "cat.png", "--quiet")
    assert code == 0, err
    assert (tmp_path / "cat.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("target", sorted(RECIPE_FILES))
def test_export_and_parity(cli, user_folder, tmp_path, target):
    folder, extra = user_folder
    out = tmp_path / target
    code, _, err = cli("export", "--recipe", RECIPES / RECIPE_FILES[target], "--model", folder,
                       *extra, "--latent-size", 8, "--out", out)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    if extra:
        assert manifest["model"]["stored_dtype"] == "float16"
    code, stdout, err = cli("parity", out, "--model", folder, *extra, "--prompts", "a cat",
                            "--threads", 1, "--quiet", "--out", tmp_path / "report")
    assert code == 0, stdout + err
    report = json.loads((tmp_path / "report" / "parity.json").read_text())
    assert report["summary"]["status"] == "pass", report["summary"]
    assert {c["status"] for c in report["components"].values()} == {"pass"}
