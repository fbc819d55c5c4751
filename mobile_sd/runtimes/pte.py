"""Run ``.pte`` files on the host with ExecuTorch's Python runtime, and profile them (ETDump).

Weights separated into a ``.ptd`` must be passed to the loader: a program whose weights live in
a ``.ptd`` *segfaults* when loaded without it (executorch 1.5.1), so :func:`run_pte` picks up
``<name>.ptd`` beside ``<name>.pte`` automatically.

Threads: XNNPACK's threadpool is process-wide; resetting it after a method is loaded crashes,
so ``num_threads`` is applied before loading, and only when it differs from the current count.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mobile_sd.errors import BackendUnavailableError, InvalidArgumentError
from mobile_sd.runtimes.io import FileRunner, RuntimeSkip, check_io

_ETDUMP_BUFFER = 64 << 20  # debug buffer for ETDump; only events are kept, not intermediates


def data_file_for(pte_path: str | Path) -> Path | None:
    """The ``.ptd`` beside a ``.pte`` (same stem), if it exists."""
    ptd = Path(pte_path).with_suffix(".ptd")
    return ptd if ptd.is_file() else None


def set_threads(num_threads: int | None) -> None:
    """Size XNNPACK's threadpool; call before loading any program (see module docstring)."""
    if num_threads is None:
        return
    if num_threads < 1:
        raise InvalidArgumentError(f"num_threads must be >= 1, got {num_threads}")
    from executorch.extension.pybindings import portable_lib

    if portable_lib._threadpool_get_thread_count() != num_threads:
        portable_lib._unsafe_reset_threadpool(num_threads)


def _as_tensors(inputs: Sequence[Any]) -> list:
    return [torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
            for x in inputs]


def _read_flatbuffer(path: Path) -> bytes:
    """The flatbuffer part of a .pte: weights and delegate payloads (segments) are not read."""
    from executorch.exir._serialize._program import _get_extended_header

    with open(path, "rb") as handle:
        header = _get_extended_header(handle.read(64))
        handle.seek(0)
        return handle.read(header.program_size if header else -1)


def program_backends(program_data: bytes) -> set[str]:
    """Backend ids a serialized program (``.pte`` bytes, or its flatbuffer part) delegates to."""
    # Private executorch helpers: the public deserializer would also copy every segment.
    from executorch.exir._serialize._program import _flatbuffer_to_program, _get_extended_header

    header = _get_extended_header(program_data[:64])
    size = header.program_size if header else len(program_data)
    program = _flatbuffer_to_program(program_data[:size])
    return {d.id for plan in program.execution_plan for d in plan.delegates}


def check_runnable(program_data: bytes, where: str) -> None:
    """BackendUnavailableError if the program needs a backend this host's runtime lacks.

    Loading such a method does not raise: the process exits (executorch 1.5.1), so check first.
    """
    from executorch.runtime import Runtime

    registered = set(Runtime.get().backend_registry.registered_backend_names)
    missing = sorted(program_backends(program_data) - registered)
    if missing:
        raise BackendUnavailableError(
            f"{where} is delegated to {', '.join(missing)}, which this host's ExecuTorch runtime "
            f"does not have (it has {', '.join(sorted(registered))}); run it on a device with "
            "that backend (Core ML: Apple devices; QNN: Snapdragon with the QNN libraries)")


def load_program(path: Path, data_path: Path | None, **kwargs):
    """The one way a ``.pte`` is loaded here: checks its backends first (a missing one
    would end the process), then loads it with its ``.ptd`` (``data_path``)."""
    from executorch.runtime import Runtime

    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"{path}: no such .pte file")
    check_runnable(_read_flatbuffer(path), str(path))
    return Runtime.get().load_program(path, data_path=data_path, **kwargs)


def check_loads(path: Path, data_path: Path | None) -> None:
    """ProgramLoadError unless this host's runtime loads ``forward`` of the ``.pte`` at ``path``.

    Loading initializes every delegate, so XNNPACK builds its runtime graph: a node it rejects
    (which lowering does not catch) fails here, not on the device. The load runs in a child
    process: XNNPACK packs the weights again when it loads (2.9 GB for the full-size fp32
    UNet), which on top of the exporter's own memory took ``make export-android`` from 10.3 to
    13.1 GB peak; a child's memory is returned when it exits, and its log names the node.
    """
    import subprocess
    import sys

    from mobile_sd.errors import ProgramLoadError

    code = ("import sys; from pathlib import Path; from mobile_sd.runtimes.pte import "
            "load_program; load_program(Path(sys.argv[1]), Path(sys.argv[2]) if sys.argv[2] else None)"
            ".load_method('forward')")
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(data_path or "")],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        # The runtime's own log lines ("[XNNCompiler.cpp:1262] Failed to create ...") and
        # the Python error; not the import noise before them.
        log = [line for line in proc.stderr.splitlines()
               if line.startswith("[") or line.startswith("RuntimeError")]
        raise ProgramLoadError(
            f"{path.name}: the ExecuTorch runtime on this host refuses to load the exported "
            "program; nothing was written. Runtime log: "
            f"{' | '.join(log[-6:]) or proc.stderr[-800:]}. "
            "Keep the op out of the delegate (surgery pass or fp32_fallback) or report it with "
            "that log.")


def run_pte(path: str | Path, inputs: Sequence, num_threads: int | None = None,
            data_path: str | Path | None = None, as_numpy: bool = False) -> list:
    """Run ``forward`` of a ``.pte`` on the host; returns the outputs (tensors, or numpy arrays).

    Example (not run by the tests: it needs real artifacts)::

        run_pte("out/unet.pte", (latents, t, context), num_threads=2)
        # -> [tensor(...)]
    """
    path = Path(path)
    set_threads(num_threads)
    data = Path(data_path) if data_path else data_file_for(path)
    program = load_program(path, data)
    expected = program.metadata("forward").num_inputs()
    if len(inputs) != expected:
        raise InvalidArgumentError(f"{path.name} takes {expected} inputs, got {len(inputs)}")
    method = program.load_method("forward")
    # clone: outputs must not depend on the program's memory once it is released
    outputs = [o.clone() for o in method.execute(_as_tensors(inputs))]
    return [o.numpy() for o in outputs] if as_numpy else outputs


def etdump_op_table(path: str | Path, inputs: Sequence, runs: int = 1,
                    etrecord_path: str | Path | None = None,
                    data_path: str | Path | None = None) -> list[dict]:
    """Per-op timing rows (:func:`mobile_sd.runtimes.etdump.op_totals`) of ``runs`` forward
    passes of the ``.pte`` at ``path``, slowest total first."""
    from mobile_sd.runtimes.etdump import op_totals

    path = Path(path)
    data = Path(data_path) if data_path else data_file_for(path)
    program = load_program(path, data, enable_etdump=True, debug_buffer_size=_ETDUMP_BUFFER)
    method = program.load_method("forward")
    for _ in range(runs):
        method.execute(_as_tensors(inputs))
    with tempfile.TemporaryDirectory(prefix="msd-etdump-") as tmp:
        etdump = Path(tmp) / "run.etdp"
        program.write_etdump_result_to_file(str(etdump), str(Path(tmp) / "debug.bin"))
        return op_totals(etdump, etrecord_path)


# manifest backend name -> name ExecuTorch registers the delegate under
ET_BACKENDS = {"xnnpack": "XnnpackBackend", "coreml": "CoreMLBackend", "qnn": "QnnBackend",
               "vulkan": "VulkanBackend", "openvino": "OpenvinoBackend", "mps": "MPSBackend"}
_ET_DTYPES = {6: "float32", 5: "float16", 4: "int64", 3: "int32", 11: "bool"}


def missing_backend(backend: str | None) -> str | None:
    """The ExecuTorch name of ``backend`` when this runtime does not register it, else None."""
    from executorch.runtime import Runtime

    needed = ET_BACKENDS.get((backend or "").lower())
    if needed and not Runtime.get().backend_registry.is_available(needed):
        return needed
    return None


def registered_backends() -> list[str]:
    from executorch.runtime import Runtime

    return list(Runtime.get().backend_registry.registered_backend_names)


class PteRunner(FileRunner):
    """An ExecuTorch program, loaded once (``forward`` kept loaded across calls)."""
    runtime = "executorch"

    def __init__(self, path: Path, inputs, outputs, backend: str, num_threads: int | None):
        self.path, self.inputs, self.outputs, self.backend = path, inputs, outputs, backend
        set_threads(num_threads)  # before any method is loaded (resetting later crashes)
        needed = missing_backend(backend)
        if needed:
            where = "; Core ML runs only on Apple devices / macOS" if backend == "coreml" else ""
            raise RuntimeSkip(f"{path.name} is delegated to {needed}, which this ExecuTorch "
                              f"runtime does not register (it has "
                              f"{', '.join(registered_backends())})" + where)
        self.data_path = data_file_for(path)
        program = load_program(path, self.data_path)
        meta = program.metadata("forward")
        check_io(str(path), "input", inputs, _pte_io(meta.num_inputs(), meta.input_tensor_meta))
        check_io(str(path), "output", outputs, _pte_io(meta.num_outputs(), meta.output_tensor_meta))
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
