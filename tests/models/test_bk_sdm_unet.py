"""BK-SDM-style UNets (no mid block, fewer layers / stages) equal diffusers' own
``UNet2DConditionModel`` built from the same config and weights (tiny widths)."""
from __future__ import annotations

import shutil

import pytest
import torch
import yaml

from mobile_sd.models.diffusers_compat import diffusers_config_from_unet_spec, unet_spec_from_diffusers
from mobile_sd.models.folder import load_model_folder, write_model_folder
from mobile_sd.models.spec import load_spec
from mobile_sd.models.unet import EfficientUNet
from mobile_sd.models.zoo import build_model

CA_DOWN, DOWN, CA_UP, UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"
COMMON = {"cross_attention_dim": 32, "attention_head_dim": 2, "norm_num_groups": 8,
          "sample_size": 16}
CONFIGS = {
    # BK-SDM-Small: SD-1.5's stages, one layer per down stage, no mid block
    "bk-sdm-small": {"block_out_channels": [16, 32, 32, 32], "layers_per_block": 1,
                     "down_block_types": [CA_DOWN] * 3 + [DOWN], "mid_block_type": None,
                     "up_block_types": [UP] + [CA_UP] * 3},
    # BK-SDM-Tiny: also without the innermost stage
    "bk-sdm-tiny": {"block_out_channels": [16, 32, 32], "layers_per_block": 1,
                    "down_block_types": [CA_DOWN] * 3, "mid_block_type": None,
                    "up_block_types": [CA_UP] * 3},
    # per-block lists, a mid block without attention, deeper transformers
    "per-block": {"block_out_channels": [16, 32], "layers_per_block": [1, 2],
                  "transformer_layers_per_block": [2, 1],
                  "down_block_types": [CA_DOWN, DOWN], "mid_block_type": "UNetMidBlock2D",
                  "up_block_types": [UP, CA_UP]},
}


def _diffusers_unet(config):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**COMMON, **config}).eval()
    for p in unet.parameters():  # non-trivial weights everywhere
        p.data.normal_(0, 0.1)
    return unet


def _outputs(unet, diffusers=False):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([3.0, 871.0])
    ctx = torch.randn(2, 77, 32, generator=gen)
    with torch.no_grad():
        out = unet(x, t, ctx)
    return out.sample if diffusers else out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_outputs_match_diffusers(name):
    theirs = _diffusers_unet(CONFIGS[name])
    spec = unet_spec_from_diffusers(dict(theirs.config))
    assert (spec.mid is None) == (CONFIGS[name]["mid_block_type"] is None)
    ours = EfficientUNet(spec).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ref = _outputs(theirs, diffusers=True)
    assert ref.abs().mean() > 0.01
    assert (ref - _outputs(ours)).abs().max().item() <= 1e-5
    # and back: the spec writes a diffusers config that builds the same network
    config = diffusers_config_from_unet_spec(spec)
    assert config["mid_block_type"] == CONFIGS[name]["mid_block_type"]
    assert unet_spec_from_diffusers(config) == spec


def test_diffusers_saved_bk_sdm_unet_loads_from_a_folder(sd15_tiny_folder, tmp_path):
    folder = tmp_path / "bk"
    shutil.copytree(sd15_tiny_folder, folder)
    shutil.rmtree(folder / "unet")
    theirs = _diffusers_unet(CONFIGS["bk-sdm-tiny"])
    theirs.save_pretrained(folder / "unet")  # the full config diffusers writes, all keys
    model = load_model_folder(folder)
    assert model.spec.unet.mid is None and len(model.spec.unet.down) == 3
    assert (_outputs(theirs, diffusers=True) - _outputs(model.unet)).abs().max().item() <= 1e-5


def test_spec_yaml_without_mid_block_builds_writes_and_reloads(tmp_path):
    path = __import__("mobile_sd").__path__[0] + "/specs/sd15-tiny.yaml"
    data = yaml.safe_load(open(path))
    data["name"] = "bk-tiny"
    data["unet"]["mid"] = None
    for stage in data["unet"]["down"]:
        stage.update(resnets=1, attentions=min(stage["attentions"], 1))
    for stage in data["unet"]["up"]:
        stage.update(resnets=2, attentions=min(stage["attentions"], 2))
    (tmp_path / "bk-tiny.yaml").write_text(yaml.safe_dump(data))
    spec = load_spec(str(tmp_path / "bk-tiny.yaml"))
    assert spec.unet.mid is None
    built = build_model(spec)
    write_model_folder(built, tmp_path / "out")
    loaded = load_model_folder(tmp_path / "out")
    assert loaded.spec.unet == spec.unet
    assert torch.equal(_outputs(built.unet), _outputs(loaded.unet))


@pytest.mark.parametrize("name, params, n_stages", [("bk-sdm-small", 482_346_884, 4),
                                                    ("bk-sdm-tiny", 323_384_964, 3)])
def test_shipped_bk_sdm_specs_equal_diffusers_configs(name, params, n_stages):
    """Full size on the meta device: parameter counts of nota-ai's published UNets."""
    from diffusers import UNet2DConditionModel

    spec = load_spec(name).unet
    config = diffusers_config_from_unet_spec(spec)
    assert config["mid_block_type"] is None and config["layers_per_block"] == 1
    assert len(config["block_out_channels"]) == n_stages
    with torch.device("meta"):
        ours = EfficientUNet(spec)
        theirs = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    assert ({k: tuple(v.shape) for k, v in ours.state_dict().items()}
            == {k: tuple(v.shape) for k, v in theirs.state_dict().items()})
    assert sum(p.numel() for p in ours.parameters()) == params
