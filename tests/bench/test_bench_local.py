"""The local target end to end: tiny models exported here, timed by the runner subprocess."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from mobile_sd.bench import errors as E
from mobile_sd.bench import run_bench
from mobile_sd.bench.runner import drive
from mobile_sd.bench.transports.local import LocalTransport
from mobile_sd.report.bench_report import render_report
from tests.helpers import manifests


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_manifest(folder: Path, components: dict, pipeline: dict | None) -> None:
    manifest = {"schema": "mobile-sd/manifest/v1", "recipe": {"name": "test"},
                "components": components}
    if pipeline:
        manifest["pipeline"] = pipeline
    manifests.write(folder, manifest)


@pytest.fixture(scope="module")
def onnx_folder(tmp_path_factory):
    """text_encoder / unet / decoder as tiny ONNX graphs (dynamo exporter), batch-2 CFG."""
    import torch

    folder = tmp_path_factory.mktemp("onnx-export")
    text = torch.nn.Sequential(torch.nn.Embedding(100, 8), torch.nn.Linear(8, 8))
    unet = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(),
                               torch.nn.Conv2d(8, 4, 3, padding=1))
    vae = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.Upsample(
        scale_factor=2.0), torch.nn.Conv2d(8, 3, 3, padding=1))
    specs = {"text_encoder": (text, "input_ids", torch.zeros(2, 7, dtype=torch.int64), "int64"),
             "unet": (unet, "sample", torch.randn(2, 4, 8, 8), "float32"),
             "decoder": (vae, "latent", torch.randn(1, 4, 8, 8), "float32")}
    components = {}
    for name, (model, input_name, example, dtype) in specs.items():
        path = folder / f"{name}.onnx"
        torch.onnx.export(model.eval(), (example,), str(path), dynamo=True,
                          input_names=[input_name], output_names=["out"], verbose=False)
        files = [{"path": path.name, "format": "onnx", "sha256": _sha(path)}]
        files += [{"path": data.name, "format": "onnx_data"}  # external weights, if written
                  for data in folder.glob(f"{name}.onnx.data")]
        components[name] = {
            "files": files,
            "inputs": [{"name": input_name, "shape": list(example.shape), "dtype": dtype}]}
    # A Core ML package next to the ONNX UNet: not runnable on Linux, must be skipped.
    (folder / "unet.mlpackage").mkdir()
    (folder / "unet.mlpackage" / "Manifest.json").write_text("{}")
    components["unet"]["files"].append({"path": "unet.mlpackage", "format": "mlpackage"})
    # So is a Core ML-delegated .pte (CoreMLBackend is never registered off Apple platforms).
    (folder / "text_encoder_coreml.pte").write_bytes(b"PTE")
    components["text_encoder"]["files"].append(
        {"path": "text_encoder_coreml.pte", "format": "pte", "backend": "coreml"})
    _write_manifest(folder, components, {"steps": 8, "cfg": "batch2"})
    return folder


def test_local_onnx_end_to_end(onnx_folder, tmp_path):
    out = tmp_path / "bench"
    results = run_bench(onnx_folder, "local", 1, 3, out)
    render_report(out / "bench.jsonl", out)
    by_file = {r["file"]: r for r in results}
    for name in ("text_encoder.onnx", "unet.onnx", "decoder.onnx"):
        r = by_file[name]
        assert r["status"] == "ok", r["reason"]
        assert r["stats"]["n"] == 3 and len(r["warmup_ms"]) == 1 and not r["partial"]
        assert r["stats"]["min_ms"] <= r["stats"]["median_ms"] <= r["stats"]["p90_ms"]
        assert r["runtime"]["name"] == "onnxruntime" and r["peak_rss_mb"] > 0
        assert r["artifact_sha256"] == _sha(onnx_folder / name)
        assert r["versions"]["onnxruntime"] and r["device"]["kind"] == "local"
    for name in ("unet.mlpackage", "text_encoder_coreml.pte"):
        skipped = by_file[name]
        assert skipped["status"] == "skipped" and "needs macOS" in skipped["reason"]
        assert skipped["stats"]["median_ms"] is None  # never reported as measured

    text = (out / "bench.md").read_text()
    assert (out / "bench_components.png").stat().st_size > 1000
    assert "End-to-end estimate" in text and "| unet | 8 |" in text  # batch-2 UNet: 8 calls
    assert "| text_encoder | 1 |" in text  # batch-2 text encoder: one call
    assert "skipped" in text and "1,960.00" in text
    lines = (out / "bench.jsonl").read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(l)["schema"] == "mobile-sd/bench-result/v1"
                                   for l in lines)


def test_local_pte_with_etdump_op_table(tmp_path):
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    folder = tmp_path / "pte-export"
    folder.mkdir()
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 1)).eval()
    example = (torch.randn(1, 4, 16, 16),)
    program = to_edge_transform_and_lower(torch.export.export(model, example),
                                          partitioner=[XnnpackPartitioner()]).to_executorch()
    (folder / "unet.pte").write_bytes(program.buffer)
    _write_manifest(folder, {"unet": {
        "files": [{"path": "unet.pte", "format": "pte", "backend": "xnnpack",
                   "sha256": _sha(folder / "unet.pte")}],
        "inputs": [{"name": "sample", "shape": [1, 4, 16, 16], "dtype": "float32"}]}}, None)
    out = tmp_path / "bench"
    [r] = run_bench(folder, "local", 1, 3, out)
    render_report(out / "bench.jsonl", out)
    assert r["status"] == "ok" and r["runtime"]["name"] == "executorch"
    assert r["stats"]["n"] == 3 and r["load_ms"] > 0
    assert r["op_table"], r.get("op_table_error")
    assert any("Convolution" in op["name"] for op in r["op_table"])
    assert abs(sum(op["share"] for op in r["op_table"]) - 1.0) < 1e-6
    text = (out / "bench.md").read_text()
    assert "Slowest ops (ETDump)" in text and "no `pipeline`" in text
    assert (out / "bench_ops_unet-unet.png").exists()


class _FakeRunnerTransport(LocalTransport):
    """This machine, with a stand-in runner program that prints progress and then dies."""

    def __init__(self, script: str) -> None:
        super().__init__()
        self.script = script

    def runner_prefix(self) -> list[str]:
        return [sys.executable, "-c", self.script]


PROGRESS = ("import sys, os, signal, time\n"
            "for i in (1, 2): print(f'mobile-sd-iter warmup {i}/2 5.0', file=sys.stderr)\n"
            "for i in (1, 2, 3): print(f'mobile-sd-iter timed {i}/9 4.{i}', file=sys.stderr)\n"
            "sys.stderr.flush()\n")


@pytest.mark.parametrize("tail, error, words", [
    ("os.kill(os.getpid(), signal.SIGSEGV)", E.RunnerCrashError, ["SIGSEGV", "local"]),
    ("time.sleep(30)", E.RunnerTimeoutError, ["did not finish in 1 s", "local"]),
    ("print('boom', file=sys.stderr); sys.exit(3)", E.RunnerFailedError, ["exited 3", "boom"]),
])
def test_local_runner_faults_keep_progress(tmp_path, tail, error, words):
    from mobile_sd.bench.harness import _partial

    artifact = tmp_path / "unet.onnx"
    artifact.write_bytes(b"onnx")
    transport = _FakeRunnerTransport(PROGRESS + tail)
    try:
        with pytest.raises(error) as info:
            drive(transport, artifact, [], 2, 9, timeout_s=1)
    finally:
        transport.close()
    assert all(w in str(info.value) for w in words), str(info.value)
    assert _partial(info.value)["iteration_ms"] == [4.1, 4.2, 4.3]
