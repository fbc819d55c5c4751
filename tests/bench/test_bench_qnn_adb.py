"""``format: qnn`` on ``--target adb``: onnxruntime_perf_test + the QNN libraries pushed beside
it, against the fake ``adb`` of test_bench_adb.py replaying output in performance_runner.cc's
format (tests/data/bench/README.md: not a device capture; nothing here is a measurement)."""
from __future__ import annotations

import hashlib

import pytest

from mobile_sd.bench.transports.ort_perf_test import arch_libs, parse_perf_test, perf_test_argv
from tests.bench.test_bench_adb import DATA, SERIAL, WORK, fake_adb  # noqa: F401 (fixture)
from tests.helpers import manifests

PERF = "onnxruntime_perf_test -e qnn"


def _file(folder, name: str, fmt: str, data: bytes) -> dict:
    (folder / name).write_bytes(data)
    return {"path": name, "format": fmt, "backend": "qnn-htp",
            "sha256": hashlib.sha256(data).hexdigest()}


@pytest.fixture
def qnn_folder(tmp_path):
    """A format 'qnn' export folder (bytes only) and a runner folder with the QNN libraries."""
    folder = tmp_path / "export"
    folder.mkdir()
    comps = {"unet": {"files": [_file(folder, "unet.onnx", "qnn_context", b"WRAPPER"),
                                _file(folder, "unet_qnn.bin", "qnn_bin", b"QNNCTX")],
                      "inputs": [{"name": "sample", "shape": [2, 4, 8, 8], "dtype": "float32"}],
                      "soc": "SM8650", "soc_model": 57, "htp_arch": "v75"}}
    manifests.write(folder, {"recipe": {"name": "android-snapfusion-qnn-fp16"},
                             "components": comps, "format": "qnn", "backend": "htp",
                             "pipeline": {"steps": 8, "cfg": "batch2"}})
    runner_dir = tmp_path / "ort-android"
    runner_dir.mkdir()
    runner = runner_dir / "onnxruntime_perf_test"
    runner.write_bytes(b"\x7fELF")
    for lib in arch_libs(75) + ("libonnxruntime.so",):
        (runner_dir / lib).write_bytes(b"\x7fELF")
    return folder, runner


def test_parse_perf_test_output():
    parsed = parse_perf_test((DATA / "ort_perf_test_qnn.stdout").read_text())
    assert parsed["load_ms"] == pytest.approx(1842.13) and parsed["first_ms"] == 412
    assert parsed["mean_ms"] == pytest.approx(361.842) and parsed["requests"] == 10
    assert parsed["p50_ms"] == pytest.approx(360.532) and parsed["max_ms"] == pytest.approx(377.024)
    assert parsed["peak_rss_mb"] == pytest.approx(700.0)
    assert parse_perf_test("garbage")["mean_ms"] is None


def test_argv_names_soc_and_strict_session():
    argv = perf_test_argv("/w/onnxruntime_perf_test", "/w/unet.onnx", 10, 69, 79, "/w")
    assert argv[:3] == ["env", "LD_LIBRARY_PATH=/w", "ADSP_LIBRARY_PATH=/w"]
    assert argv[argv.index("-e") + 1] == "qnn"
    assert "soc_model|69 htp_arch|79" in argv[argv.index("-i") + 1]
    assert argv[argv.index("-C") + 1] == "session.disable_cpu_ep_fallback|1"
    assert argv[-4:] == ["-r", "10", "-I", "/w/unet.onnx"]


def test_argv_plugin_ep():
    argv = perf_test_argv("/w/onnxruntime_perf_test", "/w/unet.onnx", 3, 57, 75, "/w",
                          plugin="/w/libonnxruntime_providers_qnn.so")
    assert "-e" not in argv
    assert argv[argv.index("--plugin_ep_libs") + 1] == (
        "QNNExecutionProvider|/w/libonnxruntime_providers_qnn.so")
    assert argv[argv.index("--plugin_eps") + 1] == "QNNExecutionProvider"
    assert argv[argv.index("--plugin_ep_options") + 1].startswith("backend_type|htp ")


def test_plugin_lib_beside_the_runner_is_used(fake_adb, qnn_folder, tmp_path):
    from mobile_sd.bench import run_bench

    set_rules, read_log = fake_adb
    set_rules([{"match": "onnxruntime_perf_test --plugin_ep_libs", "remote_rc": 0,
                "stdout_file": "ort_perf_test_qnn.stdout"}])
    folder, runner = qnn_folder
    (runner.parent / "libonnxruntime_providers_qnn.so").write_bytes(b"\x7fELF")
    [result] = run_bench(folder, f"adb:{SERIAL}", 1, 10, tmp_path / "bench", runner)
    assert result["status"] == "ok", result["reason"]
    run = next(a for a in read_log() if "--plugin_eps" in " ".join(a))
    assert f"QNNExecutionProvider|{WORK}/libonnxruntime_providers_qnn.so" in run[-1]


def test_full_run_pushes_libs_and_context(fake_adb, qnn_folder, tmp_path):
    from mobile_sd.bench import run_bench

    set_rules, read_log = fake_adb
    set_rules([{"match": PERF, "remote_rc": 0, "stdout_file": "ort_perf_test_qnn.stdout"}])
    folder, runner = qnn_folder
    [result] = run_bench(folder, f"adb:{SERIAL}", 1, 10, tmp_path / "bench", runner)
    assert result["status"] == "ok", result["reason"]
    assert result["timing_source"] == "perf_test" and result["iteration_ms"] == []
    assert result["aggregate_mean_ms"] == pytest.approx(361.842)
    assert result["aggregate"]["p90_ms"] == pytest.approx(371.883)
    assert result["runtime"]["soc_model"] == 57 and result["warmup_ms"] == [412]
    log = read_log()
    pushed = [a[-1].rsplit("/", 1)[-1] for a in log if len(a) > 2 and a[2] == "push"]
    assert {"onnxruntime_perf_test", "libQnnHtp.so", "libQnnHtpV75Skel.so",
            "libQnnHtpV75Stub.so", "libonnxruntime.so", "unet.onnx", "unet_qnn.bin"} <= set(pushed)
    run = next(a for a in log if PERF in " ".join(a))
    assert f"ADSP_LIBRARY_PATH={WORK}" in run[-1] and "soc_model|57 htp_arch|75" in run[-1]
    removed = " ".join(" ".join(a) for a in log if "rm -rf" in " ".join(a))
    assert "unet.onnx" in removed and "unet_qnn.bin" in removed


def test_fallback_refused_on_device_is_an_error(fake_adb, qnn_folder, tmp_path):
    from mobile_sd.bench import run_bench

    set_rules, _ = fake_adb
    set_rules([{"match": PERF, "remote_rc": 255,
                "stderr_file": "ort_perf_test_qnn_fallback.stderr"}])
    folder, runner = qnn_folder
    [result] = run_bench(folder, f"adb:{SERIAL}", 1, 10, tmp_path / "bench", runner)
    assert result["status"] == "error" and result["iteration_ms"] == []
    assert "exited 255" in result["reason"] and "fallback to CPU EP" in result["reason"]


def test_missing_skel_named(qnn_folder, tmp_path):
    from mobile_sd.bench.errors import ArtifactMissingOnDeviceError
    from mobile_sd.bench.transports.adb import AdbTransport
    from mobile_sd.bench.transports.ort_perf_test import OrtPerfTestDriver

    _, runner = qnn_folder
    (runner.parent / "libQnnHtpV75Skel.so").unlink()
    with pytest.raises(ArtifactMissingOnDeviceError, match="libQnnHtpV75Skel.so"):
        OrtPerfTestDriver(AdbTransport(SERIAL), runner, 57, 75)


def test_local_target_skips_with_reason(qnn_folder, tmp_path):
    from mobile_sd.bench import run_bench

    folder, _ = qnn_folder
    [result] = run_bench(folder, "local", 1, 2, tmp_path / "bench")
    assert result["status"] == "skipped" and "Snapdragon phone" in result["reason"]
