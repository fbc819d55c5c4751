"""Run the components of an export folder on the runtimes available on this host.

* ``.pte`` (ExecuTorch pybindings, :mod:`.pte`): XNNPACK / portable programs run here; a program
  delegated to a backend this runtime does not register (Core ML anywhere but macOS, QNN without
  the Qualcomm libraries) is *skipped* with the reason.
* ``.onnx``: onnxruntime, CPU provider (:mod:`.ort`).
* ``qnn_context`` (an EPContext ``.onnx`` + its ``_qnn.bin``): onnxruntime's QNN EP, on this
  host the QAIRT HTP emulator (:mod:`.qnn.runner`); skipped when onnxruntime-qnn is missing.
* ``.mlpackage``: I/O checked against the manifest, then Core ML itself on macOS, the MIL
  runtime (:mod:`.coreml`, an interpreter of the saved ML Program) everywhere else.

A chunked component (several runnable files, each with its own ``inputs``/``outputs`` in the
manifest) runs chunk by chunk, each chunk taking its inputs by name from the component's inputs
and the earlier chunks' outputs.

Example (not run by the tests: it needs real artifacts)::

    folder = "artifacts/android"
    runner = open_component(folder, load_manifest(folder), "unet")
    runner(sample, timestep, context)[0].shape
    # -> torch.Size([2, 4, 64, 64])
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mobile_sd.errors import ParityError
from mobile_sd.manifest import FileEntry, Manifest, TensorEntry
from mobile_sd.runtimes.io import ArtifactRunError, FileRunner, RuntimeSkip  # noqa: F401

RUNNABLE = {"pte": "executorch", "onnx": "onnxruntime", "mlpackage": "coreml",
            "mlmodelc": "coreml", "qnn_context": "qnn-htp"}
_TORCH = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64,
          "int32": torch.int32, "bool": torch.bool}


@dataclass
class ComponentRunner:
    """Runs one manifest component (one file, or its chunks in order) on its runtime."""
    name: str
    inputs: tuple[TensorEntry, ...]
    outputs: tuple[TensorEntry, ...]
    files: list[FileRunner]

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


def open_component(folder: str | Path, manifest: Manifest, name: str,
                   num_threads: int | None = None, coreml_mode: str = "typed") -> ComponentRunner:
    """A runner for component ``name`` of the export in ``folder`` (``coreml_mode``: how the
    MIL runtime runs Core ML packages off macOS, ``typed`` or ``fp32``-widened).

    Raises :class:`RuntimeSkip` when it cannot run on this host and :class:`ParityError` when
    the artifact does not match its manifest.
    """
    comp = manifest.components[name]
    if not comp.inputs or not comp.outputs:
        raise ParityError(f"manifest.json: component {name!r} declares no inputs/outputs; "
                          "re-export with this mobile-sd version")
    entries = comp.runnable_files()
    if not entries:
        raise ParityError(f"manifest.json: component {name!r} lists no runnable file "
                          f"(.pte, .onnx, .mlpackage); it has {[f.path for f in comp.files]}")
    chunked = len(entries) > 1
    runners = []
    for entry in entries:
        if chunked and (entry.inputs is None or entry.outputs is None):
            raise ParityError(f"manifest.json: {name} has {len(entries)} runnable files but "
                              f"{entry.path} declares no chunk inputs/outputs")
        ins = entry.inputs if chunked else comp.inputs
        outs = entry.outputs if chunked else comp.outputs
        runners.append(_open_file(Path(folder) / entry.path, entry, manifest, ins, outs,
                                  num_threads, coreml_mode))
    if chunked:
        _check_chain(name, comp.inputs, comp.outputs, runners)
    return ComponentRunner(name, comp.inputs, comp.outputs, runners)


def _check_chain(name: str, inputs, outputs, runners) -> None:
    """Chunks chain by name (Swift's ``Unet.swift``): each chunk's inputs come from the
    component's inputs or an earlier chunk's outputs; the last chunks give the outputs."""
    available = {s.name: tuple(s.shape) for s in inputs}
    for runner in runners:
        bad = [s.name for s in runner.inputs if available.get(s.name) != tuple(s.shape)]
        if bad:
            raise ParityError(f"{runner.path.name}: inputs {bad} are neither {name} inputs nor "
                              "earlier chunk outputs of that shape: the chunks do not chain; "
                              "re-export")
        available.update({s.name: tuple(s.shape) for s in runner.outputs})
    missing = [s.name for s in outputs if s.name not in available]
    if missing:
        raise ParityError(f"{name}: no chunk produces the outputs {missing}; re-export")


def _open_file(path: Path, entry: FileEntry, manifest: Manifest, ins, outs,
               num_threads, coreml_mode: str = "typed") -> FileRunner:
    kind = RUNNABLE[entry.format]
    if kind == "executorch":
        try:
            from mobile_sd.runtimes.pte import PteRunner
        except ImportError as exc:
            raise RuntimeSkip("the ExecuTorch Python runtime is not installed "
                              "(pip install executorch)") from exc
        return PteRunner(path, ins, outs, entry.backend or manifest.backend, num_threads)
    if kind == "onnxruntime":
        from mobile_sd.runtimes.ort import OnnxRunner

        return OnnxRunner(path, ins, outs, num_threads)
    if kind == "qnn-htp":
        from mobile_sd.runtimes.qnn.runner import QnnContextRunner

        return QnnContextRunner(path, ins, outs, manifest)
    from mobile_sd.runtimes.coreml.runner import CoreMLRunner

    return CoreMLRunner(path, ins, outs, coreml_mode)
