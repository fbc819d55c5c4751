"""Runtimes: chunked components run chunk by chunk; delegates this host lacks are skipped."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mobile_sd.errors import ParityError
from mobile_sd.manifest import TensorEntry as IOSpec

from tests.helpers import manifests
from mobile_sd.runtimes.component import ComponentRunner, RuntimeSkip, open_component


class _Chunk:
    runtime = "fake"

    def __init__(self, name, inputs, outputs, fn):
        self.path = Path(name)
        self.inputs = tuple(IOSpec(n, (2,), "float32") for n in inputs)
        self.outputs = tuple(IOSpec(n, (2,), "float32") for n in outputs)
        self.fn = fn

    def run(self, tensors):
        return self.fn(*tensors)


def test_chunks_take_inputs_by_name_from_inputs_and_earlier_chunks():
    io = lambda *names: tuple(IOSpec(n, (2,), "float32") for n in names)  # noqa: E731
    first = _Chunk("chunk1", ["x"], ["h"], lambda x: [x * 2])
    second = _Chunk("chunk2", ["h", "y"], ["out"], lambda h, y: [h + y])
    runner = ComponentRunner("unet", io("x", "y"), io("out"), [first, second])
    out = runner(torch.ones(2), torch.full((2,), 3.0))
    assert torch.equal(out[0], torch.full((2,), 5.0))


def test_chunk_input_nobody_provides_is_an_error():
    io = lambda *names: tuple(IOSpec(n, (2,), "float32") for n in names)  # noqa: E731
    broken = _Chunk("chunk2", ["missing"], ["out"], lambda m: [m])
    runner = ComponentRunner("unet", io("x"), io("out"), [broken])
    with pytest.raises(ParityError, match=r"chunk2 needs \['missing'\]"):
        runner(torch.ones(2))


def test_a_runtime_crash_is_reported_as_such():
    from mobile_sd.runtimes.component import ArtifactRunError

    io = lambda *names: tuple(IOSpec(n, (2,), "float32") for n in names)  # noqa: E731

    def crash(x):
        raise RuntimeError("Error 0x12 in kernel")
    runner = ComponentRunner("unet", io("x"), io("out"), [_Chunk("unet.pte", ["x"], ["out"], crash)])
    with pytest.raises(ArtifactRunError, match="unet.pte: fake raised RuntimeError: Error 0x12"):
        runner(torch.ones(2))


def test_pte_delegated_to_a_backend_this_runtime_lacks_is_skipped(exports):
    folder = exports.copy_folder(exports.export_folder("executorch", ("text_encoder",)), "coreml-pte")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["backend"] = "coreml"
    for entry in manifest["components"]["text_encoder"]["files"]:
        entry["backend"] = "coreml"
    with pytest.raises(RuntimeSkip, match="delegated to CoreMLBackend, which this ExecuTorch "
                                          "runtime does not register"):
        open_component(folder, manifests.typed(manifest, folder), "text_encoder")


def test_manifest_without_runnable_file():
    manifest = {"components": {"unet": {"files": [{"path": "unet.etrecord", "format": "etrecord",
                                                   "bytes": 1, "sha256": "0" * 64}],
                                        "inputs": [{"name": "x", "shape": [1]}],
                                        "outputs": [{"name": "y", "shape": [1]}]}}}
    with pytest.raises(ParityError, match="lists no runnable file"):
        open_component(Path("."), manifests.typed(manifest), "unet")
