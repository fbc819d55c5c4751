"""ETRecord output: the graph-only form drops the weights the devtools Inspector never reads.

An ETRecord holds the ATen and Edge programs with their weights: for the full-size fp32 UNet that
is two 2.9 GB copies (a 5.8 GB file) and, while it is serialized, as much again in memory - the
reason ``make export-android`` went past 12 GB. Mapping ETDump events to ops and to eager module
names (the per-op table of ``mobile-sd bench``, the parity locator) needs the graphs and debug
handles only, so ``etrecord: graph`` (the default) replaces every weight by a zero-stride
placeholder of the same shape and dtype (one element of storage). ``etrecord: full`` keeps
them: needed only for the Inspector's numeric-gap tools, which re-run the ATen program.

``graph`` records are built without ever copying the weights (:class:`LeanRecording`): the stock
``generate_etrecord`` deep-copies the Edge program, weights included, before lowering: 2.9 GB
more at the full-size UNet's lowering peak. The parity locator puts the
reference module's weights back by name (:func:`restore_weights`); that works for float programs
and is refused, naming the tensors, for quantized ones (their weights are not module tensors).
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from torch import nn

# Lifted constants (attention masks, resize kernels) smaller than this stay: they belong to the
# architecture, not to the trained weights. Parameters and buffers always go.
MIN_STRIPPED_CONSTANT = 4096


def is_placeholder(tensor) -> bool:
    """True for the zero-stride stand-ins of a graph-only ETRecord."""
    return (isinstance(tensor, torch.Tensor) and tensor.numel() > 1
            and all(step == 0 for step in tensor.stride()))


def _programs(held) -> list:
    if held is None:
        return []
    return list(held.values()) if isinstance(held, dict) else [held]


def _placeholder(tensor: torch.Tensor) -> torch.Tensor:
    lean = torch.zeros((), dtype=tensor.dtype).expand(tensor.shape)
    return nn.Parameter(lean, requires_grad=False) if isinstance(tensor, nn.Parameter) else lean


def _weights(program):
    """(table, key, tensor) of the weights a graph-only record leaves out."""
    for table, smallest in ((program._state_dict, 2), (program._constants, MIN_STRIPPED_CONSTANT)):
        for key, tensor in table.items():
            if isinstance(tensor, torch.Tensor) and tensor.numel() >= smallest:
                yield table, key, tensor


def lean_copy(program):
    """A deep copy of an ExportedProgram with placeholders for its weights (no weight memory)."""
    memo = {id(tensor): _placeholder(tensor) for _, _, tensor in _weights(program)}
    return copy.deepcopy(program, memo)


class LeanRecording:
    """Graph-only ETRecord pieces taken while a program is lowered, without weight copies.

    ``aten``: the program about to be lowered. Hand :meth:`edge_pass` to
    ``to_edge_transform_and_lower(transform_passes=[...])`` (it runs on the Edge program before
    partitioning, as the stock ETRecord copy does); after ``to_executorch``, :meth:`record`.
    """

    def __init__(self, aten) -> None:
        self.aten = lean_copy(aten)
        self.edge = None

    def edge_pass(self):
        from executorch.exir.pass_base import ExportedProgramPassBase, ExportedProgramPassResult

        recording = self

        class RecordEdgeProgram(ExportedProgramPassBase):
            def call(self, program):
                recording.edge = lean_copy(program)
                return ExportedProgramPassResult(program, False)

        return RecordEdgeProgram()

    def record(self, executorch_program):
        """The ETRecord of ``executorch_program`` (from ``to_executorch``) with the graphs."""
        from executorch.devtools.etrecord import ETRecord

        if self.edge is None:
            raise RuntimeError("the Edge program was never recorded: pass edge_pass() to "
                               "to_edge_transform_and_lower(transform_passes=...)")
        record = ETRecord()
        record.add_exported_program(self.aten)
        record.edge_dialect_program = self.edge
        record.add_executorch_program(executorch_program)
        return record


def strip_weights(record) -> None:
    """Replace every weight/constant tensor of the record's programs by a placeholder (in place;
    the record's programs are copies made for it, or the already-lowered ATen program)."""
    held = [record.exported_program, record.edge_dialect_program,
            *(record.graph_map or {}).values()]
    for program in (p for h in held for p in _programs(h)):
        for table, key, tensor in list(_weights(program)):
            table[key] = _placeholder(tensor)


def save_etrecord(record, path: str | Path, mode: str) -> None:
    """Write ``record`` as ``mode`` (a record with weights, e.g. from ``generate_etrecord``, is
    stripped for ``graph``; a :class:`LeanRecording` record has none to strip), byte for byte
    the same for the same export (:func:`write_reproducible_zip`)."""
    import io

    if mode == "graph":
        strip_weights(record)
    buffer = io.BytesIO()
    record.save(buffer)
    write_reproducible_zip(buffer, Path(path))


#: ``graph_id`` keys in the serialized programs' node provenance (``from_node``), at any JSON
#: escaping depth: their values are ``id(graph)``, a memory address that differs every run.
_GRAPH_ID = re.compile(rb'(graph_id\\*"\s*:\s*)(\d+)')
_BINARY_SUFFIXES = ("_state_dict", "_constants", "_example_inputs")   # torch.save payloads
#: DOS dates start in 1980; any fixed stamp makes the zip independent of the wall clock.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def write_reproducible_zip(source, path: Path) -> None:
    """Copy the ETRecord zip ``source`` to ``path`` with fixed entry timestamps and graph ids
    renumbered 1, 2, ... in order of first appearance. The renumbering is one mapping for the
    whole record, so every equality the Inspector relies on (a node's ``from_node`` graph id
    against ``export_graph_id``) still holds."""
    import zipfile

    ids: dict[bytes, bytes] = {}

    def number(raw: bytes) -> bytes:
        return ids.setdefault(raw, str(len(ids) + 1).encode())

    with zipfile.ZipFile(source) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "export_graph_id":
                data = re.sub(rb"\d+", lambda m: number(m.group(0)), data)
            elif not info.filename.endswith(_BINARY_SUFFIXES):
                data = _GRAPH_ID.sub(lambda m: m.group(1) + number(m.group(2)), data)
            entry = zipfile.ZipInfo(info.filename, date_time=_ZIP_EPOCH)
            entry.compress_type = info.compress_type
            entry.external_attr = 0o644 << 16
            dst.writestr(entry, data)


def restore_weights(program, module: nn.Module) -> None:
    """Put ``module``'s tensors (by name) in place of ``program``'s placeholders, in place.

    ``program``: an ExportedProgram, or a GraphModule from ``ExportedProgram.module()``.
    Raises ValueError naming the placeholders ``module`` has no tensor for.
    """
    source = {**dict(module.named_buffers()), **module.state_dict()}
    if isinstance(program, torch.fx.GraphModule):
        slots = [(dict(program.named_parameters()), False), (dict(program.named_buffers()), False)]
    else:
        slots = [(program._state_dict, True), (program._constants, True)]
    missing = []
    for table, replace in slots:
        for key, tensor in list(table.items()):
            if not is_placeholder(tensor):
                continue
            value = source.get(key)
            if value is None or value.shape != tensor.shape or value.dtype != tensor.dtype:
                missing.append(key)
            elif replace:
                table[key] = (nn.Parameter(value.detach(), requires_grad=False)
                              if isinstance(tensor, nn.Parameter) else value.detach())
            else:
                tensor.data = value.detach().clone()
    if missing:
        raise ValueError(
            f"the ETRecord is graph-only (recipe `etrecord: graph`) and the reference module has "
            f"no tensor for its weights {sorted(missing)[:3]} (quantized programs keep their own); "
            "re-export with `etrecord: full` to look inside this program")
