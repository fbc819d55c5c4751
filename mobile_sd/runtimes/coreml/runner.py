"""Core ML packages on this host, for parity: I/O always checked against the manifest, then
predictions through Core ML itself on macOS and through the MIL runtime (:class:`MilModel`,
this package) everywhere else, so a Core ML row is a real check on Linux too."""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Sequence

from mobile_sd.manifest import TensorEntry
from mobile_sd.runtimes.io import FileRunner, RuntimeSkip, check_io


class CoreMLRunner(FileRunner):
    """A Core ML package (inputs and outputs by name). ``engine`` says what runs it:
    ``coreml`` (macOS) or ``mil`` (the MIL interpreter, ``mode`` typed or fp32)."""
    runtime = "coreml"

    def __init__(self, path: Path, inputs, outputs, mode: str = "typed"):
        try:
            import coremltools as ct
        except ImportError as exc:
            raise RuntimeSkip("coremltools is not installed") from exc
        self.path, self.inputs, self.outputs = Path(path), inputs, outputs
        self.mode = mode
        on_mac = platform.system() == "Darwin"
        if on_mac and mode == "typed":
            self.engine, self.model = "coreml", ct.models.MLModel(str(path))
        else:
            from mobile_sd.runtimes.coreml.model import MilModel

            # First: its loader checks the package (ML Program, weights, blobs) in one line.
            self.engine, self.model = "mil", MilModel(self.path, mode=mode)
        spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
        described = spec.description
        check_io(str(path), "input", inputs, _sorted_like(inputs, coreml_io(described.input)))
        check_io(str(path), "output", outputs, _sorted_like(outputs, coreml_io(described.output)))

    def feed(self, tensors) -> dict:
        """The inputs by name, as numpy (what both Core ML and the MIL runtime take)."""
        return {spec.name: t.detach().numpy() for spec, t in zip(self.inputs, tensors)}

    def run(self, tensors):
        import numpy as np
        import torch

        result = self.model.predict(self.feed(tensors))
        return [torch.from_numpy(np.asarray(result[o.name])) for o in self.outputs]


def coreml_io(features) -> list[tuple[str, tuple, str]]:
    """(name, shape, dtype) of a Core ML model description's features."""
    from coremltools.proto import FeatureTypes_pb2 as ft

    names = {ft.ArrayFeatureType.FLOAT32: "float32", ft.ArrayFeatureType.FLOAT16: "float16",
             ft.ArrayFeatureType.INT32: "int32", ft.ArrayFeatureType.DOUBLE: "float64"}
    return [(f.name, tuple(f.type.multiArrayType.shape),
             names.get(f.type.multiArrayType.dataType, str(f.type.multiArrayType.dataType)))
            for f in features]


def _sorted_like(declared: Sequence[TensorEntry], found: list) -> list:
    """Core ML keeps I/O by name, not position: order the found list like the manifest."""
    by_name = {f[0]: f for f in found}
    ordered = [by_name.pop(d.name) for d in declared if d.name in by_name]
    return ordered + list(by_name.values())
