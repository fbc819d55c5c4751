"""Report rendering from result records: Markdown tables, budget, partial marks, PNG plots."""
from __future__ import annotations

from pathlib import Path

from mobile_sd.bench.manifest import BenchItem
from mobile_sd.bench.results import make_result
from mobile_sd.report.bench_report import append_results, load_results, render_report


def _ctx(run_id):
    return {"schema": "mobile-sd/bench-result/v1", "run_id": run_id, "started": "2026-11-28",
            "target": "adb:R5CT32ABCDE", "git_sha": "cee0d3e5760f", "warmup": 2, "iters": 10,
            "device": {"model": "SM-S918B", "os": "Android 14", "abi": "arm64-v8a",
                       "soc": "SM8550", "free_storage_bytes": 2**35},
            "versions": {"executorch": "1.5.1", "torch": "2.13.0"},
            "recipe": {"name": "xnnpack-fp32"}, "pipeline": {"steps": 8, "cfg": "batch2"}}


def _item(component, batch):
    return BenchItem(component, Path(f"/x/{component}.pte"), "pte", "xnnpack", "ab" * 32,
                     [{"name": "x", "shape": [batch, 4], "dtype": "float32"}])


def _line(ms, **extra):
    return {"status": "ok", "iteration_ms": ms, "warmup_ms": [ms[0] * 1.2], "load_ms": 900.0,
            "peak_rss_mb": 1157.8, "runtime": {"name": "executorch executor_runner"}, **extra}


def test_render_report(tmp_path):
    from mobile_sd.bench.errors import RunnerCrashError

    ops = [{"name": "Convolution (NHWC, F32) IGEMM #12", "median_ms": 41.2, "mean_ms": 41.5,
            "runs": 10, "share": 0.6},
           {"name": "Fully Connected (NC, F32) GEMM #3", "median_ms": 27.5, "mean_ms": 27.6,
            "runs": 10, "share": 0.4}]
    old = [make_result(_ctx("run1"), _item("unet", 2), line=_line([400.0, 410.0]))]
    run = [make_result(_ctx("run2"), _item("text_encoder", 2), line=_line([6.0, 6.2, 5.9])),
           make_result(_ctx("run2"), _item("unet", 2), line=_line([320.0, 330.0, 325.0])),
           make_result(_ctx("run2"), _item("vae_decoder", 1), line=_line([150.0, 149.0]),
                       status="error", error=RunnerCrashError("executor_runner crashed")),
           make_result(_ctx("run2"), BenchItem("unet", Path("/x/unet.mlpackage"), "mlpackage",
                                               None, None, [{"name": "x", "shape": [2, 4],
                                                             "dtype": "float16"}]),
                       status="skipped", reason="Core ML runs only on Apple devices")]
    run[1]["op_table"] = ops
    jsonl = tmp_path / "bench.jsonl"
    append_results(jsonl, old + run)
    with open(jsonl, "a") as handle:
        handle.write('{"truncated": ')  # a writer killed mid-line
    records, bad = load_results(jsonl)
    assert len(records) == 5 and bad == 1

    paths = render_report(jsonl, tmp_path)
    text = paths["markdown"].read_text()
    assert "Run `run2`" in text and "SM-S918B, Android 14, arm64-v8a, SM8550" in text
    assert "| vae_decoder | vae_decoder.pte | pte/xnnpack | error (partial) | 149.50 |" in text
    assert "| unet | unet.mlpackage | mlpackage | skipped | - |" in text
    assert "Core ML runs only on Apple devices" in text
    # pte/xnnpack: text x1 (batch 2) + unet 8 x 325 + decoder: partial result not counted
    assert "| text_encoder | 1 | 6.00 | 6.00 | 4.00 | 8.00 | 1.500 |" in text
    assert "| unet | 8 | 325.00 | 2,600.00 | 230.00 | 1,840.00 | 1.413 |" in text
    assert "| **total** | | | **-** | | **1,960.00** | **-** |" in text
    assert "Convolution (NHWC, F32) IGEMM #12 | 41.200 | 60.0%" in text
    assert "## Earlier runs" in text and "| 400.00" not in text.split("## Earlier runs")[0]
    assert "1 unreadable line(s)" in text
    for png in paths["plots"]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    assert {p.name for p in paths["plots"]} == {"bench_components.png",
                                                "bench_ops_unet-unet.png"}
