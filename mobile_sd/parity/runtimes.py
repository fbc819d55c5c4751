"""Load and run the artifacts of an export folder on the runtimes available on this host.

* ``.pte`` (ExecuTorch pybindings): XNNPACK / portable programs run here; a program delegated
  to a backend this runtime does not register (Core ML anywhere but macOS, QNN without the
  Qualcomm libraries) is *skipped* with the reason.
* ``.onnx``: onnxruntime, CPU provider.
* ``.mlpackage``: Core ML predictions only on macOS; elsewhere its I/O is still checked against
  the manifest, then it is skipped with the reason.

Before anything runs, the I/O the loaded program declares (names where the format keeps them,
shapes, dtypes) is compared with ``manifest.json``: a mismatch is a :class:`ParityError`.
A chunked component (several runnable files, each with its own ``inputs``/``outputs`` in the
manifest) runs chunk by chunk, each chunk taking its inputs by name from the component's inputs
and the earlier chunks' outputs.

>>> folder = "artifacts/android"
>>> runner = open_component(folder, load_manifest(folder), "unet")  # doctest: +SKIP
>>> runner(sample, timestep, context)[0].shape                     # doctest: +SKIP
torch.Size([2, 4, 64, 64])
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mobile_sd.errors import ParityError

RUNNABLE = {"pte": "executorch", "onnx": "onnxruntime", "mlpackage": "coreml",
            "mlmodelc": "coreml"}
# manifest backend name -> name ExecuTorch registers the delegate under
ET_BACKENDS = {"xnnpack": "XnnpackBackend", "coreml": "CoreMLBackend", "qnn": "QnnBackend",
               "vulkan": "VulkanBackend", "openvino": "OpenvinoBackend"}
_ET_DTYPES = {6: "float32", 5: "float16", 4: "int64", 3: "int32", 11: "bool"}
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16",
               "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}
_TORCH = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64,
          "int32": torch.int32, "bool": torch.bool}


class RuntimeSkip(Exception):
    """This artifact cannot run on this host; ``reason`` says why (reported as *skipped*)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ArtifactRunError(RuntimeError):
    """The artifact loaded but its runtime failed while running it (a failed check)."""


@dataclass(frozen=True)
class IOSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def from_entry(cls, entry: dict) -> "IOSpec":
        return cls(entry["name"], tuple(int(s) for s in entry["shape"]), entry.get("dtype", "float32"))


def check_io(where: str, kind: str, declared: Sequence[IOSpec],
             found: Sequence[tuple[str | None, Sequence, str]]) -> None:
    """Compare the ``found`` I/O of a loaded program with the manifest's ``declared`` I/O.

    ``found``: (name or None when the format keeps no names, shape (ints, or str/None for a
    dynamic dim), dtype). Raises ParityError listing every difference.
    """
    problems = []
    if len(found) != len(declared):
        problems.append(f"{len(found)} {kind}s in the file, {len(declared)} in manifest.json "
                        f"({', '.join(d.name for d in declared)})")
    for want, (name, shape, dtype) in zip(declared, found):
        label = f"{kind} {want.name!r}"
        if name is not None and name != want.name:
            problems.append(f"{kind} named {name!r} in the file where manifest.json has {want.name!r}")
        static = [s if isinstance(s, int) else None for s in shape]
        if len(static) != len(want.shape) or any(s is not None and s != w
                                                 for s, w in zip(static, want.shape)):
            problems.append(f"{label} has shape {list(shape)} in the file, "
                            f"{list(want.shape)} in manifest.json")
        if dtype != want.dtype:
            problems.append(f"{label} is {dtype} in the file, {want.dtype} in manifest.json")
    if problems:
        raise ParityError(f"{where}: I/O differs from manifest.json: {'; '.join(problems)}. "
                          "The file and its manifest do not belong together: re-export the folder")


class _FileRunner:
    """One runnable file: ``run(list of tensors in declared input order) -> list of tensors``."""
    path: Path
    inputs: tuple[IOSpec, ...]
    outputs: tuple[IOSpec, ...]

    def run(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:  # pragma: no cover
        raise NotImplementedError


class PteRunner(_FileRunner):
    """An ExecuTorch program, loaded once (``forward`` kept loaded across calls)."""
    runtime = "executorch"

    def __init__(self, path: Path, inputs, outputs, backend: str, num_threads: int | None):
        from executorch.runtime import Runtime

        from mobile_sd.exporters.et_runtime import data_file_for, set_threads

        self.path, self.inputs, self.outputs, self.backend = path, inputs, outputs, backend
        runtime = Runtime.get()
        set_threads(num_threads)  # before any method is loaded (resetting later crashes)
        self.data_path = data_file_for(path)
        program = runtime.load_program(path, data_path=self.data_path)
        meta = program.metadata("forward")
        check_io(str(path), "input", inputs, _pte_io(meta.num_inputs(), meta.input_tensor_meta))
        check_io(str(path), "output", outputs, _pte_io(meta.num_outputs(), meta.output_tensor_meta))
        needed = ET_BACKENDS.get(backend)
        if needed and not runtime.backend_registry.is_available(needed):
            where = "; Core ML runs only on Apple devices / macOS" if backend == "coreml" else ""
            raise RuntimeSkip(f"{path.name} is delegated to {needed}, which this ExecuTorch "
                              f"runtime does not register (it has "
                              f"{', '.join(runtime.backend_registry.registered_backend_names)})"
                              + where)
        try:
            self.method = program.load_method("forward")
        except RuntimeError as exc:  # a registered delegate that cannot initialize here (QNN)
            raise RuntimeSkip(f"{path.name}: the {backend} delegate cannot initialize on this "
                              f"host ({exc})") from exc
        self.program = program

    def run(self, tensors):
        # clone: outputs live in the program's planned memory, reused by the next execute
        return [t.clone() for t in self.method.execute([t.contiguous() for t in tensors])]


def _pte_io(count: int, meta) -> list[tuple[None, tuple, str]]:
    """(None: a .pte keeps no names, shape, dtype) of each input/output tensor."""
    return [(None, tuple(meta(i).sizes()), _ET_DTYPES.get(meta(i).dtype(), str(meta(i).dtype())))
            for i in range(count)]


class OnnxRunner(_FileRunner):
    """An ONNX model in an onnxruntime CPU session."""
    runtime = "onnxruntime"

    def __init__(self, path: Path, inputs, outputs, num_threads: int | None):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeSkip("onnxruntime is not installed (pip install onnxruntime)") from exc
        self.path, self.inputs, self.outputs = path, inputs, outputs
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise ParityError(f"{path}: onnxruntime cannot load it ({exc}); re-export it") from exc
        found = lambda args: [(a.name, a.shape, _ORT_DTYPES.get(a.type, a.type))  # noqa: E731
                              for a in args]
        check_io(str(path), "input", inputs, found(self.session.get_inputs()))
        check_io(str(path), "output", outputs, found(self.session.get_outputs()))

    def run(self, tensors):
        feed = {spec.name: t.numpy() for spec, t in zip(self.inputs, tensors)}
        return [torch.from_numpy(np.ascontiguousarray(o)) for o in self.session.run(None, feed)]


class CoreMLRunner(_FileRunner):
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
        check_io(str(path), "input", inputs, _sorted_like(inputs, _coreml_io(described.input)))
        check_io(str(path), "output", outputs, _sorted_like(outputs, _coreml_io(described.output)))
        if not on_mac:
            raise RuntimeSkip(f"Core ML predictions run only on macOS (this host is "
                              f"{platform.system()}); the package's I/O was checked against the "
                              "manifest")
        self.model = model

    def run(self, tensors):
        feed = {spec.name: t.numpy() for spec, t in zip(self.inputs, tensors)}
        result = self.model.predict(feed)
        return [torch.from_numpy(np.asarray(result[o.name])) for o in self.outputs]


def _coreml_io(features) -> list[tuple[str, tuple, str]]:
    from coremltools.proto import FeatureTypes_pb2 as ft

    names = {ft.ArrayFeatureType.FLOAT32: "float32", ft.ArrayFeatureType.FLOAT16: "float16",
             ft.ArrayFeatureType.INT32: "int32", ft.ArrayFeatureType.DOUBLE: "float64"}
    return [(f.name, tuple(f.type.multiArrayType.shape),
             names.get(f.type.multiArrayType.dataType, str(f.type.multiArrayType.dataType)))
            for f in features]


def _sorted_like(declared: Sequence[IOSpec], found: list) -> list:
    """Core ML keeps I/O by name, not position: order the found list like the manifest."""
    by_name = {f[0]: f for f in found}
    ordered = [by_name.pop(d.name) for d in declared if d.name in by_name]
    return ordered + list(by_name.values())


@dataclass
class ComponentRunner:
    """Runs one manifest component (one file, or its chunks in order) on its runtime."""
    name: str
    inputs: tuple[IOSpec, ...]
    outputs: tuple[IOSpec, ...]
    files: list[_FileRunner]

    @property
    def runtime(self) -> str:
        return self.files[0].runtime

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """Outputs (float32 for floating outputs) for inputs in the manifest's order."""
        if len(inputs) != len(self.inputs):
            raise ParityError(f"{self.name}: {len(inputs)} inputs given, the manifest declares "
                              f"{len(self.inputs)} ({', '.join(s.name for s in self.inputs)})")
        env = {spec.name: t.to(_TORCH[spec.dtype]) for spec, t in zip(self.inputs, inputs)}
        for runner in self.files:
            missing = [s.name for s in runner.inputs if s.name not in env]
            if missing:
                raise ParityError(f"{runner.path.name} needs {missing}, which neither the "
                                  f"component inputs nor an earlier chunk provide; the manifest's "
                                  "chunk I/O is inconsistent: re-export")
            try:
                outs = runner.run([env[s.name].to(_TORCH[s.dtype]) for s in runner.inputs])
            except Exception as exc:  # each runtime raises its own types
                raise ArtifactRunError(f"{runner.path.name}: {runner.runtime} raised "
                                       f"{type(exc).__name__}: {str(exc).strip()[:300]}") from exc
            env.update({s.name: o for s, o in zip(runner.outputs, outs)})
        return [env[s.name].float() if env[s.name].is_floating_point() else env[s.name]
                for s in self.outputs]


def open_component(folder: str | Path, manifest: dict, name: str,
                   num_threads: int | None = None) -> ComponentRunner:
    """A runner for component ``name`` of the export in ``folder``.

    Raises :class:`RuntimeSkip` when it cannot run on this host and :class:`ParityError` when
    the artifact does not match its manifest.
    """
    comp = manifest["components"][name]
    inputs = tuple(IOSpec.from_entry(e) for e in comp.get("inputs", []))
    outputs = tuple(IOSpec.from_entry(e) for e in comp.get("outputs", []))
    if not inputs or not outputs:
        raise ParityError(f"manifest.json: component {name!r} declares no inputs/outputs; "
                          "re-export with this mobile-sd version")
    entries = [e for e in comp.get("files", []) if e.get("format") in RUNNABLE]
    if not entries:
        raise ParityError(f"manifest.json: component {name!r} lists no runnable file "
                          f"(.pte, .onnx, .mlpackage); it has "
                          f"{[e.get('path') for e in comp.get('files', [])]}")
    chunked = len(entries) > 1
    runners = []
    for entry in entries:
        if chunked and not ("inputs" in entry and "outputs" in entry):
            raise ParityError(f"manifest.json: {name} has {len(entries)} runnable files but "
                              f"{entry['path']} declares no chunk inputs/outputs")
        ins = tuple(IOSpec.from_entry(e) for e in entry["inputs"]) if chunked else inputs
        outs = tuple(IOSpec.from_entry(e) for e in entry["outputs"]) if chunked else outputs
        runners.append(_open_file(Path(folder) / entry["path"], entry, manifest, ins, outs,
                                  num_threads))
    return ComponentRunner(name, inputs, outputs, runners)


def _open_file(path: Path, entry: dict, manifest: dict, ins, outs, num_threads) -> _FileRunner:
    kind = RUNNABLE[entry["format"]]
    if kind == "executorch":
        try:
            import executorch.runtime  # noqa: F401
        except ImportError as exc:
            raise RuntimeSkip("the ExecuTorch Python runtime is not installed "
                              "(pip install executorch)") from exc
        return PteRunner(path, ins, outs, entry.get("backend") or manifest.get("backend", ""),
                         num_threads)
    if kind == "onnxruntime":
        return OnnxRunner(path, ins, outs, num_threads)
    return CoreMLRunner(path, ins, outs)
