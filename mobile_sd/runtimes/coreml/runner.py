"""Core ML packages on this host: I/O always checked against the manifest; predictions through
Core ML itself only on macOS."""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Sequence

from mobile_sd.manifest import TensorEntry
from mobile_sd.runtimes.io import FileRunner, RuntimeSkip, check_io


class CoreMLRunner(FileRunner):
    """A Core ML package; predictions only on macOS (inputs and outputs by name)."""
    runtime = "coreml"

    def __init__(self, path: Path, inputs, outputs):
        try:
            import coremltools as ct
        except ImportError as exc:
            raise RuntimeSkip("coremltools is not installed") from exc
        self.path, self.inputs, self.outputs = path, inputs, outputs
        on_mac = platform.system() == "Darwin"
        model = ct.models.MLModel(str(path), skip_model_load=not on_mac)
        described = model.get_spec().description
        check_io(str(path), "input", inputs, _sorted_like(inputs, coreml_io(described.input)))
        check_io(str(path), "output", outputs, _sorted_like(outputs, coreml_io(described.output)))
        if not on_mac:
            raise RuntimeSkip(f"Core ML predictions run only on macOS (this host is "
                              f"{platform.system()}); the package's I/O was checked against the "
                              "manifest")
        self.model = model

    def run(self, tensors):
        import numpy as np
        import torch

        feed = {spec.name: t.numpy() for spec, t in zip(self.inputs, tensors)}
        result = self.model.predict(feed)
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
