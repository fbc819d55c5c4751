"""SoC table: ids, unknown-SoC error, each id creating an HTP device in the emulator."""
from __future__ import annotations

import pytest

from mobile_sd.errors import RecipeError
from mobile_sd.runtimes.qnn.socs import DEFAULT_SOC, SOCS, get_soc


def test_table_ids():
    assert DEFAULT_SOC == "SM8650"
    assert {(s.name, s.soc_model, s.htp_arch) for s in SOCS.values()} == {
        ("SM8550", 43, 73), ("SM8650", 57, 75), ("SM8750", 69, 79)}
    assert get_soc(None).name == "SM8650"
    assert get_soc("sm8750").product == "Snapdragon 8 Elite"
    assert get_soc("SM8550").provider_options() == {"soc_model": "43", "htp_arch": "73"}


def test_unknown_soc_lists_known():
    with pytest.raises(RecipeError) as exc:
        get_soc("SM8450")
    msg = str(exc.value)
    assert "'SM8450'" in msg and all(name in msg for name in SOCS)


@pytest.mark.parametrize("soc", sorted(SOCS))
def test_each_soc_runs_on_emulator(soc):
    pytest.importorskip("onnxruntime_qnn", reason="onnxruntime-qnn not installed")
    from mobile_sd.runtimes.qnn import htp
    from tests.helpers.qnn_tiny_graphs import component, feeds, psnr

    path, *_ = component("conv_gn_silu")
    inputs, ref = feeds("conv_gn_silu", 0)
    sess = htp.create_session(path, soc, "fp16")              # strict: all nodes on HTP
    assert psnr(sess.run(None, inputs)[0], ref) >= 40
    report = htp.session_assignment(sess)
    assert report.all_on_htp and report.partitions == 1


def test_recipe_soc_names_match_the_table():
    """recipes.py (a lower layer) keeps the names only; this keeps both lists equal."""
    from mobile_sd.recipes import QNN_SOCS, QnnOptions

    assert set(QNN_SOCS) == set(SOCS) and QnnOptions().soc == DEFAULT_SOC
