"""Stats and the end-to-end budget: plain arithmetic, checked by hand."""
from __future__ import annotations

import pytest

from mobile_sd.bench import budget
from mobile_sd.bench.stats import summarize
from mobile_sd.errors import InvalidArgumentError


def test_summarize_values():
    s = summarize([10.0, 12.0, 11.0, 30.0, 13.0])
    assert s["n"] == 5 and s["median_ms"] == 12.0 and s["min_ms"] == 10.0
    assert s["max_ms"] == 30.0 and s["mean_ms"] == 15.2
    assert s["p90_ms"] == pytest.approx(23.2)  # numpy linear interpolation: 13 + 0.6 * 17


def test_summarize_empty_is_not_a_number():
    assert summarize([]) == {"n": 0, "median_ms": None, "p90_ms": None, "min_ms": None,
                             "max_ms": None, "mean_ms": None, "std_ms": None}


@pytest.mark.parametrize("cfg, text_batch, unet_batch, calls", [
    ("batch2", 1, 1, {"text_encoder": 2, "unet": 16, "decoder": 1}),
    ("batch2", 2, 2, {"text_encoder": 1, "unet": 8, "decoder": 1}),
    ("folded", 1, 1, {"text_encoder": 2, "unet": 8, "decoder": 1}),
    ("none", 1, 1, {"text_encoder": 1, "unet": 8, "decoder": 1}),
])
def test_calls_per_image(cfg, text_batch, unet_batch, calls):
    assert budget.calls_per_image(8, cfg, text_batch, unet_batch) == calls


def test_paper_budget_reproduces_its_total():
    paper = budget.SNAPFUSION_IPHONE_14_PRO
    est = budget.estimate(paper.per_call_ms, paper.calls)
    assert est["total_ms"] == 2 * 4 + 8 * 230 + 116 == 1964
    assert abs(est["total_ms"] - paper.total_ms) / paper.total_ms < 0.01  # paper rounds
    assert "arXiv:2306.00980" in paper.source


def test_estimate_and_compare():
    calls = budget.calls_per_image(8, "batch2", 1, 1)
    est = budget.estimate({"text_encoder": 5.0, "unet": 100.0, "decoder": 200.0}, calls)
    assert est["components"]["unet"] == {"per_call_ms": 100.0, "calls": 16, "total_ms": 1600.0}
    assert est["total_ms"] == 10 + 1600 + 200
    cmp = budget.compare(est)
    assert cmp["unet"]["ratio"] == round(100 / 230, 3)
    assert cmp["decoder"]["paper_per_image_ms"] == 116.0
    assert cmp["total"] == {"ms": 1810.0, "paper_ms": 1960.0, "ratio": round(1810 / 1960, 3),
                            "within_budget": True}


def test_missing_component_gives_no_total():
    est = budget.estimate({"unet": 100.0}, budget.calls_per_image(8, "folded", 1, 1))
    assert est["total_ms"] is None and est["components"]["text_encoder"]["total_ms"] is None
    assert budget.compare(est)["total"]["within_budget"] is None


def test_bad_pipeline_values():
    with pytest.raises(InvalidArgumentError, match="unknown cfg mode 'cfg2'"):
        budget.calls_per_image(8, "cfg2", 1, 1)
    with pytest.raises(InvalidArgumentError, match="steps must be >= 1"):
        budget.calls_per_image(0, "folded", 1, 1)
