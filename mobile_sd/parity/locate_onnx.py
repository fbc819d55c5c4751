"""ONNX side of the divergence locator: module values as extra graph outputs.

The dynamo exporter (``torch.onnx.export(..., dynamo=True)``) writes each node's module scopes
into its ``pkg.torch.onnx.name_scopes`` metadata, e.g.
``['', 'down_blocks.0', 'down_blocks.0.resnets.0', 'down_blocks.0.resnets.0.conv1', 'conv2d_1']``
(module paths, then the node's own name). A module's value is the output of the *last* node in
its scope whose shape equals the eager module output's shape. onnxsim drops that metadata
(mobile-sd's exporter puts it back on the nodes onnxsim kept); a graph without any is searched
by parameter names instead (a node reading ``<module>.weight``/``.bias`` belongs to that leaf
module), leaves only.

Weights may live in external data files: the model is loaded without them, the extra outputs
are added, and the copy is saved in a temp folder with links to the original data files, so a
multi-GB UNet is never copied.
"""
from __future__ import annotations

import ast
import os
from collections import OrderedDict
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from mobile_sd.parity.locate_tree import descend

_SCOPES = "pkg.torch.onnx.name_scopes"


def _node_scopes(node) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == _SCOPES:
            try:
                return [s for s in ast.literal_eval(prop.value)[:-1] if s]
            except (ValueError, SyntaxError):
                return []
    return []


def _shapes(graph) -> dict[str, tuple]:
    shapes = {}
    for info in list(graph.value_info) + list(graph.output):
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    return shapes


class OnnxValues:
    """Values of module scopes of one ONNX file, computed with onnxruntime on fixed inputs."""

    def __init__(self, path: Path, input_names: Sequence[str], inputs: Sequence[torch.Tensor]):
        import onnx

        self.path = Path(path)
        self.model = onnx.load(str(path), load_external_data=False)
        if not self.model.graph.value_info:
            self.model = onnx.shape_inference.infer_shapes(self.model)
        graph = self.model.graph
        self.shapes = _shapes(graph)
        self.value_infos = {v.name: v for v in list(graph.value_info) + list(graph.output)}
        # module path -> node outputs inside its scope, in graph (topological) order
        self.in_scope: dict[str, list[str]] = {}
        for node in graph.node:
            for scope in _node_scopes(node):
                self.in_scope.setdefault(scope, []).extend(node.output)
        self.scoped = bool(self.in_scope)
        if not self.scoped:
            self._scopes_from_parameters(graph)
        self.feed = {n: t.numpy() for n, t in zip(input_names, inputs)}

    def _scopes_from_parameters(self, graph) -> None:
        """Without scope metadata (e.g. another tool's simplified file), a node that reads ``<module>.weight`` or
        ``<module>.bias`` belongs to that (leaf) module: only leaves can be located then."""
        params = {init.name for init in graph.initializer}
        readers: dict[str, int] = {}
        for node in graph.node:
            for name in set(node.input) & params:
                readers[name] = readers.get(name, 0) + 1
        for node in graph.node:
            # A weight read by several nodes was deduplicated (equal initial values): ambiguous.
            owners = {n.rsplit(".", 1)[0] for n in node.input if readers.get(n) == 1 and "." in n}
            for owner in owners:
                self.in_scope.setdefault(owner, []).extend(node.output)

    def match(self, module: str, shape: tuple) -> str | None:
        """The value standing for ``module``'s output, or None if none has its shape (a
        dynamic axis, as in optimum-layout graphs, matches any size)."""
        values = list(reversed(self.in_scope.get(module, [])))
        return next((v for v in values if self.shapes.get(v) == tuple(shape)), None) or next(
            (v for v in values if _fits(self.shapes.get(v), shape)), None)

    def evaluate(self, modules: Sequence[str], shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
        names = {m: self.match(m, shapes[m]) for m in modules}
        names = {m: v for m, v in names.items() if v is not None}
        if not names:
            return {}
        values = self._run(sorted(set(names.values())))
        return {m: values[v] for m, v in names.items()}

    def _run(self, outputs: list[str]) -> dict[str, np.ndarray]:
        import onnx
        import onnxruntime as ort

        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        del model.graph.output[:]
        model.graph.output.extend(self.value_infos[v] for v in outputs)
        with tempfile.TemporaryDirectory(prefix="msd-locate-") as tmp:
            for location in _external_files(self.model):
                os.symlink(self.path.parent.absolute() / location, Path(tmp) / location)
            copy = Path(tmp) / self.path.name
            onnx.save(model, str(copy))
            session = ort.InferenceSession(str(copy), providers=["CPUExecutionProvider"])
            return dict(zip(outputs, session.run(outputs, self.feed)))


def _fits(found: tuple | None, shape: tuple) -> bool:
    return found is not None and len(found) == len(shape) and all(
        f is None or f == s for f, s in zip(found, shape))


def _external_files(model) -> set[str]:
    files = set()
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                files.add(entry.value)
    return files


def locate_onnx(path: Path, input_specs, inputs, eager, gate_db: float) -> dict:
    """Locate the first module of the ONNX file ``path`` that departs from the reference
    (an :class:`~mobile_sd.parity.locate.EagerModules`) on ``inputs``."""
    values = OnnxValues(path, [s.name for s in input_specs], inputs)
    shapes = {p: shape for p, (_, shape) in eager.calls.items()}
    calls = eager.calls
    if not values.scoped:  # leaves only, compared in execution order
        calls = OrderedDict((p, c) for p, c in calls.items() if p in values.in_scope)
    result = descend(calls, eager.values, lambda paths: values.evaluate(paths, shapes), gate_db)
    result["method"] = ("onnx name scopes" if values.scoped else
                        "parameter names (the graph has no name-scope metadata)") + \
        " -> extra graph outputs (onnxruntime)"
    return result


def initializers(path: Path, names: set[str]) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, array)`` of the floating initializers of ``path`` named in ``names``."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    for init in model.graph.initializer:
        if init.name in names and init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            yield init.name, numpy_helper.to_array(init, base_dir=str(Path(path).parent))
