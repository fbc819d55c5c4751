"""ONNX Runtime on this host: one way to open a session, and the parity runner over it.

torch is not imported at module level: the device-side bench runner times ONNX files with
this module and never needs torch.
"""
from __future__ import annotations

from pathlib import Path

from mobile_sd.errors import ParityError
from mobile_sd.runtimes.io import FileRunner, RuntimeSkip, check_io

DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16",
          "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}


def cpu_session(path: str | Path, num_threads: int | None = None, quiet: bool = True):
    """An ``InferenceSession`` on the CPU provider (``num_threads`` intra-op threads)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
    if quiet:
        options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxRunner(FileRunner):
    """An ONNX model in an onnxruntime CPU session."""
    runtime = "onnxruntime"

    def __init__(self, path: Path, inputs, outputs, num_threads: int | None):
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise RuntimeSkip("onnxruntime is not installed (pip install onnxruntime)") from exc
        self.path, self.inputs, self.outputs = path, inputs, outputs
        try:
            self.session = cpu_session(path, num_threads)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise ParityError(f"{path}: onnxruntime cannot load it ({exc}); re-export it") from exc
        found = lambda args: [(a.name, a.shape, DTYPES.get(a.type, a.type))  # noqa: E731
                              for a in args]
        check_io(str(path), "input", inputs, found(self.session.get_inputs()))
        check_io(str(path), "output", outputs, found(self.session.get_outputs()))

    def run(self, tensors):
        import numpy as np
        import torch

        feed = {spec.name: _fit(spec, t).numpy() for spec, t in zip(self.inputs, tensors)}
        return [torch.from_numpy(np.ascontiguousarray(o)) for o in self.session.run(None, feed)]


def _fit(spec, tensor):
    """A scalar graph input (optimum's UNet ``timestep``) given per batch item, as the
    pipeline holds it: its one value; ParityError when the items differ."""
    if spec.shape or tensor.dim() != 1:
        return tensor
    if not bool((tensor == tensor[0]).all()):
        raise ParityError(f"input {spec.name!r} is a scalar in the graph but differs across the "
                          f"batch ({tensor.tolist()[:4]}); one value is needed")
    return tensor[0]
