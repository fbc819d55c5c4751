"""Architecture specs: strict loading, the layout rule, skip wiring, SnapFusion's table."""
from __future__ import annotations

import pytest
import yaml

from mobile_sd.errors import SpecError
from mobile_sd.models.spec import default_layout, list_specs, load_spec
from mobile_sd.models.unet import skip_plan


def test_shipped_specs_have_tiny_variants_with_same_topology():
    names = list_specs()
    assert {"sd15", "sd15-tiny", "snapfusion", "snapfusion-tiny"} <= set(names)
    for full in ("sd15", "snapfusion"):
        big, tiny = load_spec(full).unet, load_spec(f"{full}-tiny").unet
        shape = lambda u: [(s.resnets, s.attentions, s.order, s.downsample, s.upsample)  # noqa
                           for s in (*u.down, u.mid, *u.up)]
        assert shape(big) == shape(tiny)
        assert load_spec(full).decoder.format == load_spec(f"{full}-tiny").decoder.format


def test_snapfusion_matches_paper_table():
    unet = load_spec("snapfusion").unet
    stages = [*unet.down, unet.mid, *unet.up]
    assert [(s.attentions, s.resnets) for s in stages] == [
        (0, 2), (2, 2), (2, 1), (1, 4), (6, 2), (3, 3), (0, 3)]
    assert [s.channels for s in stages] == [320, 640, 1280, 1280, 1280, 640, 320]
    assert unet.mid.order == "RRARR" and unet.up[0].order == "RAAARAAA"
    assert load_spec("snapfusion").decoder.block_out_channels == (64, 128, 256, 256)
    assert load_spec("snapfusion").scheduler.prediction_type == "v_prediction"


def test_default_layout_reproduces_sd15():
    assert default_layout(2, 2) == "RARA"
    assert default_layout(3, 3) == "RARARA"
    assert default_layout(2, 1) == "RAR"
    assert default_layout(3, 0) == "RRR"


def test_skip_plan_sd15_and_snapfusion():
    plan, unused = skip_plan(load_spec("sd15").unet)
    assert plan == [[1280] * 3, [1280, 1280, 640], [640, 640, 320], [320] * 3] and unused == []
    plan, unused = skip_plan(load_spec("snapfusion").unet)
    assert plan == [[1280, 640], [640, 640, 320], [320] * 3] and unused == [3]


def test_unknown_spec_name_lists_valid_ones():
    with pytest.raises(SpecError, match=r"unknown spec 'nope'; valid specs: .*snapfusion"):
        load_spec("nope")


def _write(tmp_path, data, name="custom.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _spec_dict():
    return yaml.safe_load(open(__import__("mobile_sd").__path__[0] + "/specs/snapfusion-tiny.yaml"))


def test_unknown_key_lists_valid_keys(tmp_path):
    data = _spec_dict()
    data["unet"]["down"][1]["chanels"] = 3
    with pytest.raises(SpecError, match=r"unet\.down\[1\]: unknown key 'chanels'; valid keys: "
                                        r"channels, resnets, attentions"):
        load_spec(_write(tmp_path, data))


def test_invalid_values_are_named(tmp_path):
    data = _spec_dict()
    data["scheduler"]["prediction_type"] = "sample"
    with pytest.raises(SpecError, match=r"scheduler.prediction_type: invalid value 'sample'; "
                                        r"valid values: 'epsilon', 'v_prediction'"):
        load_spec(_write(tmp_path, data, "a.yaml"))
    data = _spec_dict()
    data["unet"]["mid"]["layout"] = "RARR"
    with pytest.raises(SpecError, match="layout 'RARR' has 3 R / 1 A but the stage declares"):
        load_spec(_write(tmp_path, data, "b.yaml"))
    data = _spec_dict()
    data["unet"]["down"][0]["channels"] = "wide"
    with pytest.raises(SpecError, match=r"down\[0\].channels: expected int, got str"):
        load_spec(_write(tmp_path, data, "c.yaml"))


def test_up_stage_without_enough_skips_is_rejected(tmp_path):
    data = _spec_dict()
    data["unet"]["up"][0]["resnets"] = 3
    from mobile_sd.models.unet import EfficientUNet
    spec = load_spec(_write(tmp_path, data, "d.yaml"))
    with pytest.raises(ValueError, match="up stage 0 has 3 ResNets but only 2 skip"):
        EfficientUNet(spec.unet)
