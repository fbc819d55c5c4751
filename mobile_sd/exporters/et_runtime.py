"""Run ``.pte`` files on the host with ExecuTorch's Python runtime, and profile them (ETDump).

Weights separated into a ``.ptd`` must be passed to the loader: a program whose weights live in
a ``.ptd`` *segfaults* when loaded without it (executorch 1.5.1), so :func:`run_pte` picks up
``<name>.ptd`` beside ``<name>.pte`` automatically.

Threads: XNNPACK's threadpool is process-wide; resetting it after a method is loaded crashes,
so ``num_threads`` is applied before loading, and only when it differs from the current count.
"""
from __future__ import annotations

import re
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mobile_sd.errors import BackendUnavailableError, InvalidArgumentError

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


def _load(path: Path, data_path: Path | None, **kwargs):
    from executorch.runtime import Runtime

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

    code = ("import sys; from pathlib import Path; from mobile_sd.exporters.et_runtime import "
            "_load; _load(Path(sys.argv[1]), Path(sys.argv[2]) if sys.argv[2] else None)"
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

    >>> run_pte("out/unet.pte", (latents, t, context), num_threads=2)  # doctest: +SKIP
    [tensor(...)]
    """
    path = Path(path)
    set_threads(num_threads)
    data = Path(data_path) if data_path else data_file_for(path)
    program = _load(path, data)
    expected = program.metadata("forward").num_inputs()
    if len(inputs) != expected:
        raise InvalidArgumentError(f"{path.name} takes {expected} inputs, got {len(inputs)}")
    method = program.load_method("forward")
    # clone: outputs must not depend on the program's memory once it is released
    outputs = [o.clone() for o in method.execute(_as_tensors(inputs))]
    return [o.numpy() for o in outputs] if as_numpy else outputs


def _row_name(event) -> str:
    name = re.sub(r" #\d+$", "", event.name)
    if name == "DELEGATE_CALL" and event.delegate_backend_name:  # named when an ETRecord is given
        return f"DELEGATE_CALL[{event.delegate_backend_name}]"
    return name


def _kind(event) -> str:
    if event.is_delegated_op:
        return "delegate_op"
    if event.name == "DELEGATE_CALL":
        return "delegate_call"
    if event.name.startswith("Method::"):
        return "method"
    return "operator"


def _event_rows(inspector) -> list[dict]:
    stats: dict[str, dict] = defaultdict(lambda: {"count": 0, "total_ms": 0.0})
    for block in inspector.event_blocks:
        if block.name != "Execute":
            continue
        for event in block.events:
            # OPERATOR_CALL wraps the native_call_* event of the same op: counted once.
            if event.name == "OPERATOR_CALL" or event.perf_data is None:
                continue
            row = stats[_row_name(event)]
            row.setdefault("kind", _kind(event))
            row.setdefault("backend", event.delegate_backend_name)
            row["count"] += len(event.perf_data.raw)
            row["total_ms"] += float(sum(event.perf_data.raw))
    rows = [{"name": name, **row, "mean_ms": row["total_ms"] / max(row["count"], 1)}
            for name, row in stats.items()]
    return sorted(rows, key=lambda r: r["total_ms"], reverse=True)


def etdump_op_table(path: str | Path, inputs: Sequence, runs: int = 1,
                    etrecord_path: str | Path | None = None,
                    data_path: str | Path | None = None) -> list[dict]:
    """Per-op timing rows from an ETDump of ``runs`` forward passes, slowest total first.

    Rows: ``name`` (XNNPACK op like ``Convolution (NHWC, F32) IGEMM``, ``DELEGATE_CALL[backend]``,
    portable ``native_call_<op>.out``, or ``Method::execute``), ``kind``, ``backend``, ``count``,
    ``total_ms``, ``mean_ms``. Delegate ops are nested inside their DELEGATE_CALL, and everything
    inside Method::execute: do not sum rows of different kinds.
    """
    from executorch.devtools import Inspector

    path = Path(path)
    data = Path(data_path) if data_path else data_file_for(path)
    program = _load(path, data, enable_etdump=True, debug_buffer_size=_ETDUMP_BUFFER)
    method = program.load_method("forward")
    for _ in range(runs):
        method.execute(_as_tensors(inputs))
    with tempfile.TemporaryDirectory(prefix="msd-etdump-") as tmp:
        etdump = Path(tmp) / "run.etdp"
        program.write_etdump_result_to_file(str(etdump), str(Path(tmp) / "debug.bin"))
        inspector = Inspector(etdump_path=str(etdump),
                              etrecord=str(etrecord_path) if etrecord_path else None)
        return _event_rows(inspector)
