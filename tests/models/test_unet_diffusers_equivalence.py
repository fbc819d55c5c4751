"""The sd15 spec builds diffusers' SD-v1.5 UNet: same keys, shapes and outputs (tiny widths)."""
from __future__ import annotations

import torch

from mobile_sd.models.diffusers_compat import diffusers_config_from_unet_spec, unet_spec_from_diffusers
from mobile_sd.models.spec import load_spec
from mobile_sd.models.unet import EfficientUNet


def _diffusers_unet(spec):
    from diffusers import UNet2DConditionModel

    config = diffusers_config_from_unet_spec(spec)
    return UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})


def test_sd15_config_round_trip():
    for name in ("sd15", "sd15-tiny"):
        spec = load_spec(name).unet
        config = diffusers_config_from_unet_spec(spec)
        assert config["block_out_channels"] == [s.channels for s in spec.down]
        assert unet_spec_from_diffusers(config) == spec
    assert diffusers_config_from_unet_spec(load_spec("snapfusion").unet) is None


def test_sd15_full_size_keys_and_shapes_equal_diffusers():
    spec = load_spec("sd15").unet
    with torch.device("meta"):
        ours, theirs = EfficientUNet(spec), _diffusers_unet(spec)
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert a == b
    assert sum(v.numel() for v in ours.parameters()) == 859_520_964


def test_sd15_tiny_outputs_match_diffusers():
    spec = load_spec("sd15-tiny").unet
    torch.manual_seed(0)
    theirs = _diffusers_unet(spec).eval()
    for p in theirs.parameters():  # non-trivial weights everywhere (diffusers zero-inits none
        p.data.normal_(0, 0.1)     # here, but make sure every layer matters)
    ours = EfficientUNet(spec).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([3.0, 871.0])
    ctx = torch.randn(2, 77, 32, generator=gen)
    with torch.no_grad():
        ref = theirs(x, t, ctx).sample
        out = ours(x, t, ctx)
    assert ref.abs().mean() > 0.01
    assert (ref - out).abs().max().item() <= 1e-5
