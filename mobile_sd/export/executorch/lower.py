"""ExecuTorch export of one component: ``.pte`` (+ ``.ptd``, ``.bpte``, ETRecord) and host runs.

Flow (stack.md): ``torch.export.export`` -> optional quantization -> ``to_edge_transform_and_lower
(ep, partitioner=[...], generate_etrecord=True)`` -> ``.to_executorch()`` -> save. Graph surgery
(``mobile_sd.surgery``) is the caller's choice and happens before this call.

Example (not run by the tests: it needs real artifacts)::

    result = export_pte(unet, (latents, t, context), "out/unet.pte",
                        backend="xnnpack", precision="fp32",
                        input_names=["sample", "timestep", "context"], output_names=["noise"])
    result.delegation["partitions"]
    # -> {'XnnpackBackend': 2}
    run_pte(result.pte_path, (latents, t, context))
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from mobile_sd.errors import CalibrationError, InvalidArgumentError
from mobile_sd.export.executorch.bundled import verify_bundled  # noqa: F401  (public API)
from mobile_sd.runtimes.pte import etdump_op_table, run_pte  # noqa: F401  (public API)
from mobile_sd.utils.env import release_freed_memory

# A .bpte is one flatbuffer holding the whole .pte (segments included) as a byte vector:
# flatbuffers' 32-bit offsets cap it at 2 GiB ("BuilderSizeError: cannot grow buffer beyond
# 2 gigabytes"). The fp32 UNet with inline weights (~2.9 GB) is over it.
BPTE_MAX_BYTES = 2**31 - 1
_BPTE_MARGIN = 1 << 20   # the bundle's own tables and alignment padding


@dataclasses.dataclass
class ExportResult:
    """What :func:`export_pte` wrote and measured (JSON-able via :meth:`to_dict`)."""
    pte_path: str
    backend: str
    precision: str
    input_names: list[str]
    output_names: list[str]
    delegation: dict[str, Any]
    export_seconds: float
    peak_rss_mb: float
    ptd_path: str | None = None
    bpte_path: str | None = None
    etrecord_path: str | None = None
    delegate_limits: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    bundle_skipped: str | None = None   # why no .bpte was written although one was asked for

    @property
    def paths(self) -> list[str]:
        """Every file written, ``.pte`` first."""
        return [p for p in (self.pte_path, self.ptd_path, self.bpte_path, self.etrecord_path) if p]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _names(given: Sequence[str] | None, count: int, prefix: str, what: str) -> list[str]:
    if given is None:
        return [f"{prefix}{i}" for i in range(count)]
    if len(given) != count:
        raise InvalidArgumentError(f"{len(given)} {what} names given for {count} {what}s")
    return list(given)


def _check_inputs(module: nn.Module, example_inputs: tuple, out_path: Path, precision: str,
                  calibration, input_names: Sequence[str] | None) -> None:
    if not isinstance(module, nn.Module):
        raise InvalidArgumentError(f"module must be an nn.Module, got {type(module).__name__}")
    if not all(isinstance(x, torch.Tensor) for x in example_inputs):
        raise InvalidArgumentError("example_inputs must be a tuple of tensors")
    if out_path.suffix != ".pte":
        raise InvalidArgumentError(f"out_path must end in .pte, got {out_path}")
    if precision != "int8":
        return
    if calibration is None:
        raise CalibrationError("precision 'int8' needs calibration: an iterable of input tuples "
                               "shaped like example_inputs (a few dozen real samples)")
    if isinstance(calibration, (list, tuple)):
        from mobile_sd.compress.pt2e import check_sample
        if not calibration:
            raise CalibrationError("calibration is empty: give at least one input tuple")
        for i, sample in enumerate(calibration):  # fail before minutes of export, not after
            check_sample(sample, example_inputs, i, input_names)


def _program(module, example_inputs, backend, precision, calibration, fp32_fallback,
             separate_weights, tag, input_names):
    """(ExportedProgram to lower or None for QNN, which exports itself; notes)."""
    from mobile_sd.export.executorch import precision as et_precision

    if backend == "qnn":
        return None, []
    ep, notes = et_precision.exported_for(module, example_inputs, backend, precision,
                                         calibration, fp32_fallback, input_names)
    dropped = et_precision.drop_unused_constants(ep)
    if dropped:
        notes.append(f"{len(dropped)} buffers no op reads were left out of the program "
                     f"(e.g. {', '.join(dropped[:3])})")
    if separate_weights:
        ep = et_precision.tag_weights_external(ep, example_inputs, tag)
    return ep, notes


def _lower(ep, module, example_inputs, backend, precision, calibration, coreml_target, soc,
           input_names, etrecord: str):
    """(EdgeProgramManager with the backend's partitions, LeanRecording or None).

    ``etrecord``: "none", "graph" (recorded without weight copies) or "full" (the stock
    ``generate_etrecord``, which deep-copies the weights).
    """
    from executorch.exir import to_edge_transform_and_lower

    from mobile_sd.export.executorch import backends as et_backends, errors as et_errors
    from mobile_sd.export.executorch.etrecord import LeanRecording

    if backend == "qnn":
        from mobile_sd.export.executorch.qnn import lower_qnn
        return lower_qnn(module, example_inputs, precision, calibration, soc, input_names,
                         etrecord != "none"), None
    partitioners = (et_backends.xnnpack_partitioners() if backend == "xnnpack"
                    else et_backends.coreml_partitioners(precision, coreml_target))
    recording = LeanRecording(ep) if etrecord == "graph" else None
    try:
        edge = to_edge_transform_and_lower(
            ep, partitioner=partitioners, generate_etrecord=etrecord == "full",
            transform_passes=[recording.edge_pass()] if recording else None)
    except Exception as exc:
        raise et_errors.translate(exc, ep.graph, backend) or exc
    return edge, recording


def _to_executorch(edge, separate_weights: bool, tag: str, graph, backend: str):
    from executorch.exir import ExecutorchBackendConfig

    from mobile_sd.export.executorch import errors as et_errors

    config = ExecutorchBackendConfig(external_constants=(lambda _node: tag)
                                     if separate_weights else False)
    try:
        return edge.to_executorch(config)
    except Exception as exc:
        raise et_errors.translate(exc, graph, backend) or exc


def _bundle_cases(bundled_io, reference: nn.Module) -> list[tuple]:
    """Test cases; a missing expected output is the eager output of the program lowered."""
    cases = []
    for inputs, expected in bundled_io:
        if expected is None:
            with torch.no_grad():
                expected = reference(*inputs)
        cases.append((tuple(inputs), expected))
    return cases


def _case_bytes(cases) -> int:
    tensors = [t for inputs, expected in cases for t in (*inputs, *_as_list(expected))]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _as_list(value) -> list:
    return list(value) if isinstance(value, (tuple, list)) else [value]


def bundle_too_big(pte_bytes: int, cases, limit: int | None = None) -> str | None:
    """Why a ``.bpte`` of this program cannot be written (over the flatbuffer cap), or None."""
    limit = BPTE_MAX_BYTES if limit is None else limit
    need = pte_bytes + _case_bytes(cases) + _BPTE_MARGIN
    if need <= limit:
        return None
    return (f"the program is {pte_bytes / 2**30:.2f} GiB with its weights inline; a .bpte "
            f"holds it in one flatbuffer, capped at {limit / 2**30:.2f} GiB. Verify with the "
            "plain .pte (parity), or export with 'weights: separate' (the .bpte then holds only "
            "the small .pte)")


def export_pte(module: nn.Module, example_inputs: tuple, out_path: str | Path, *,
               backend: str = "xnnpack", precision: str = "fp32",
               calibration: Iterable[tuple] | None = None, fp32_fallback: Sequence[str] = (),
               separate_weights: bool = False, input_names: Sequence[str] | None = None,
               output_names: Sequence[str] | None = None, coreml_target: str = "iOS17",
               etrecord_path: str | Path | None = None, etrecord_weights: bool = False,
               bundled_io: Sequence[tuple] | None = None, qnn_soc: str = "SM8650",
               overwrite: bool = False) -> ExportResult:
    """Export ``module`` to an ExecuTorch ``.pte`` for ``backend`` at ``precision``.

    Writes ``out_path`` and, when asked, ``<stem>.ptd`` (weights, ``separate_weights``),
    ``<stem>.bpte`` (``bundled_io``: ``(inputs, expected_outputs)`` pairs; ``None`` expected =
    the lowered program's own eager output; left out, with ``bundle_skipped`` saying why, when
    the program is over the 2 GiB cap of a bundle, see :data:`BPTE_MAX_BYTES`) and
    ``etrecord_path``, all or nothing. The ETRecord
    is graph-only (weights replaced by placeholders, see ``et_etrecord``) unless
    ``etrecord_weights``.
    ``calibration``: input tuples for int8; ``fp32_fallback``: module names kept fp32 (int8).
    Raises RecipeError (impossible combination), CalibrationError, UnsupportedOpError,
    BackendUnavailableError (QNN without ``QNN_SDK_ROOT``), OutputDirError - before writing;
    ProgramLoadError when the host runtime refuses to load the XNNPACK program (nothing kept).
    """
    from mobile_sd.export.executorch import backends as et_backends
    from mobile_sd.export.executorch.bundled import bundled_bytes
    from mobile_sd.export.executorch.delegation import delegation_summary
    from mobile_sd.export.executorch.etrecord import save_etrecord
    from mobile_sd.utils.env import PeakRss
    from mobile_sd.utils.staging import staged
    from mobile_sd.runtimes.pte import check_loads

    out_path, example_inputs = Path(out_path), tuple(example_inputs)
    et_backends.check_request(backend, precision, coreml_target, separate_weights)
    if backend == "qnn":
        from mobile_sd.export.executorch.qnn import require_qnn_sdk
        require_qnn_sdk()
    _check_inputs(module, example_inputs, out_path, precision, calibration, input_names)
    names_in = _names(input_names, len(example_inputs), "input_", "input")
    destinations = {"pte": out_path}
    if separate_weights:
        destinations["ptd"] = out_path.with_suffix(".ptd")
    if bundled_io:
        destinations["bpte"] = out_path.with_suffix(".bpte")
    if etrecord_path:
        destinations["etrecord"] = Path(etrecord_path)

    start = time.perf_counter()
    with PeakRss() as rss, staged(destinations, overwrite) as stage, torch.no_grad():
        module = module.eval()
        ep, notes = _program(module, example_inputs, backend, precision, calibration,
                             fp32_fallback, separate_weights, out_path.stem, input_names)
        # Reference outputs come from the program about to be lowered (quantized, if so);
        # lowering consumes its constants, so they are computed first.
        cases = (_bundle_cases(bundled_io, ep.module() if ep is not None else module)
                 if bundled_io else None)
        mode = "none" if not etrecord_path else "full" if etrecord_weights else "graph"
        edge, recording = _lower(ep, module, example_inputs, backend, precision, calibration,
                                 coreml_target, qnn_soc, input_names, mode)
        delegation = delegation_summary(edge.exported_program().graph_module)
        program = _to_executorch(edge, separate_weights, out_path.stem,
                                 edge.exported_program().graph, backend)
        program.save(str(stage.path("pte")))
        if separate_weights:
            program.write_tensor_data_to_file(str(stage.path("ptd").parent))
        skipped = bundle_too_big(stage.path("pte").stat().st_size, cases) if cases else None
        n_out = len(program.exported_program().graph_signature.user_outputs)
        names_out = _names(output_names, n_out, "output_", "output")
        record = None
        if etrecord_path:
            record = recording.record(program) if recording else program.get_etrecord()
        # Drop the lowered program (it holds the delegate's copy of the weights) before
        # bundling (a .bpte copies the whole .pte several times: inline weights included),
        # serializing the record (a full one needs as much memory again for a moment) and
        # before a child process loads the written program (check_loads).
        del program, edge, ep
        release_freed_memory()
        if cases and not skipped:   # from the written .pte: the lowered program is gone
            stage.path("bpte").write_bytes(bundled_bytes(stage.path("pte"), cases))
        if etrecord_path:
            save_etrecord(record, stage.path("etrecord"), mode)
        if backend == "xnnpack":   # the only delegate this host's runtime has
            check_loads(stage.path("pte"), stage.path("ptd") if separate_weights else None)
    final = stage.destinations
    return ExportResult(
        pte_path=str(final["pte"]), backend=backend, precision=precision, input_names=names_in,
        output_names=names_out, delegation=delegation,
        export_seconds=round(time.perf_counter() - start, 2), peak_rss_mb=round(rss.peak_mb, 1),
        ptd_path=str(final["ptd"]) if separate_weights else None,
        bpte_path=str(final["bpte"]) if bundled_io and not skipped else None,
        bundle_skipped=skipped,
        etrecord_path=str(final["etrecord"]) if etrecord_path else None,
        delegate_limits=list(et_backends.COREML_LIMITS) if backend == "coreml" else [],
        notes=notes)
