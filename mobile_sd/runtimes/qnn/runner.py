"""Parity runner of a ``qnn_context`` file: the compiled QNN context binary in the HTP emulator.

The SoC comes from the manifest (the component's ``soc``, else the recipe's); the session is
strict (every node on HTP, CPU fallback disabled), as on the phone. Without onnxruntime-qnn the
file is *skipped* with the install line, like Core ML off macOS.
"""
from __future__ import annotations

from pathlib import Path

from mobile_sd.errors import BackendUnavailableError, ParityError
from mobile_sd.runtimes.io import FileRunner, RuntimeSkip, check_io
from mobile_sd.runtimes.ort import DTYPES


def _component_of(manifest, path: Path):
    """The manifest component that lists ``path`` (for its SoC and precision)."""
    for comp in manifest.components.values():
        if any(Path(f.path).name == path.name for f in comp.files):
            return comp
    return None


class QnnContextRunner(FileRunner):
    """An EPContext wrapper (.onnx) + its context binary in an HTP session."""
    runtime = "qnn-htp"

    def __init__(self, path: Path, inputs, outputs, manifest):
        from mobile_sd.runtimes.qnn import htp

        self.path, self.inputs, self.outputs = path, inputs, outputs
        comp = _component_of(manifest, path)
        details = comp.details if comp is not None else {}
        soc = details.get("soc") or manifest.recipe.get("soc")
        precision = (comp.precision if comp is not None else None) or "fp16"
        try:
            htp.require_htp()
        except BackendUnavailableError as exc:
            raise RuntimeSkip(str(exc)) from exc
        try:
            self.session = htp.create_session(path, soc, precision)
        except Exception as exc:  # noqa: BLE001 - a bad file: say which and how to fix it
            raise ParityError(f"{path}: the QNN HTP ({soc}) cannot load it ({exc}); re-export "
                              "it") from exc
        found = lambda args: [(a.name, a.shape, DTYPES.get(a.type, a.type))  # noqa: E731
                              for a in args]
        check_io(str(path), "input", inputs, found(self.session.get_inputs()))
        check_io(str(path), "output", outputs, found(self.session.get_outputs()))

    def run(self, tensors):
        import numpy as np
        import torch

        feed = {spec.name: t.numpy() for spec, t in zip(self.inputs, tensors)}
        return [torch.from_numpy(np.ascontiguousarray(o)) for o in self.session.run(None, feed)]
