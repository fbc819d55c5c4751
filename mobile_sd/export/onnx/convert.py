"""ONNX export of one component (static shapes, named I/O) and host runs with onnxruntime.

Per stack.md: ``torch.onnx.export(..., dynamo=True)`` (needs onnxscript) at opset 20, then
onnxsim. ORT's transformer optimizer for ``model_type="unet"`` emits CUDA-only ops, so it is not
used. fp16 uses ORT's own ``float16`` converter (``onnxruntime.transformers.float16``, already
installed with onnxruntime) with ``keep_io_types=True``: weights and compute in fp16, inputs
and outputs stay fp32. Models over 2 GB (protobuf's limit) keep their weights in
``<name>.onnx.data`` beside the graph.

Example (not run by the tests: it needs real artifacts)::

    r = export_onnx(unet, (latents, t, ctx), "out/unet.onnx",
                    input_names=["sample", "timestep", "context"], output_names=["noise"])
    run_onnx(r.path, (latents, t, ctx))[0].shape
    # -> (1, 4, 64, 64)
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from mobile_sd.errors import ExportError, InvalidArgumentError

PROTOBUF_LIMIT = 2**31 - 1  # bytes; larger models need external data


@dataclasses.dataclass
class OnnxResult:
    """What :func:`export_onnx` wrote (JSON-able via :meth:`to_dict`)."""
    path: str
    input_names: list[str]
    output_names: list[str]
    opset: int
    fp16: bool
    simplified: bool
    node_count: int
    export_seconds: float
    peak_rss_mb: float
    data_path: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    # input/output name -> [axis index, ...] of its dynamic (symbolic) dims in the graph
    dynamic_axes: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    @property
    def paths(self) -> list[str]:
        return [p for p in (self.path, self.data_path) if p]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _to_proto(module: nn.Module, example_inputs: tuple, input_names, output_names, opset: int,
              dynamic_shapes=None):
    program = torch.onnx.export(module, example_inputs, dynamo=True, opset_version=opset,
                                input_names=list(input_names), output_names=list(output_names),
                                dynamic_shapes=dynamic_shapes, external_data=False,
                                verbose=False)
    proto = program.model_proto
    del program
    _drop_rewriter_graphs()
    return proto


def _drop_rewriter_graphs() -> None:
    """Let the exported module's weights go once the proto is made.

    torch.onnx's optimizer runs onnxscript's module-level rewrite rules, and each rule's
    pattern matcher keeps the last graph it matched (``_graph``, ``_match``); that graph's
    initializers wrap the module's parameters, so the eager weights stayed alive after
    export (the full-size UNet's 2.9 GB, found with gc referrers). A matcher re-initializes
    these at its next match, so clearing them is safe."""
    import gc

    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:            # another onnxscript layout: nothing known to clear
        return
    for obj in gc.get_objects():
        if isinstance(obj, SimplePatternMatcher):
            for attr in ("_graph", "_match", "_current_node", "_tracer"):
                if attr in vars(obj):
                    setattr(obj, attr, None)


def dynamic_axes(proto) -> dict[str, list[int]]:
    """Graph input/output name -> indices of its symbolic (dynamic) dims."""
    axes = {}
    for value in [*proto.graph.input, *proto.graph.output]:
        dims = value.type.tensor_type.shape.dim
        found = [i for i, d in enumerate(dims) if not d.HasField("dim_value")]
        if found:
            axes[value.name] = found
    return axes


def _check_names(proto, input_names: Sequence[str], output_names: Sequence[str]) -> None:
    got_in = [i.name for i in proto.graph.input]
    got_out = [o.name for o in proto.graph.output]
    if got_in != list(input_names) or got_out != list(output_names):
        raise ExportError(f"ONNX graph I/O is {got_in} -> {got_out}, expected {list(input_names)}"
                          f" -> {list(output_names)}: give one name per tensor input/output")


def _over_protobuf_limit(proto) -> bool:
    """True when the model cannot be serialized in one protobuf (``ByteSize`` itself raises
    EncodeError past 2 GB, e.g. the 2.9 GB fp32 UNet)."""
    from google.protobuf.message import EncodeError

    try:
        return proto.ByteSize() > PROTOBUF_LIMIT
    except EncodeError:
        return True


def _simplify(proto, notes: list[str]):
    import onnxsim

    if _over_protobuf_limit(proto):
        notes.append("onnxsim skipped: the model is over protobuf's 2 GB limit")
        return proto, False
    simplified, ok = onnxsim.simplify(proto)
    if not ok:
        notes.append("onnxsim could not validate the simplified model; kept the original")
        return proto, False
    _restore_metadata(proto, simplified)
    return simplified, True


def _restore_metadata(original, simplified) -> None:
    """Give simplified nodes back the metadata onnxsim drops (torch's module name scopes, which
    the parity locator uses to name a diverging module), matched by node name, else by output."""
    by_name = {n.name: n.metadata_props for n in original.graph.node if n.metadata_props}
    by_output = {o: n.metadata_props for n in original.graph.node if n.metadata_props
                 for o in n.output}
    for node in simplified.graph.node:
        if node.metadata_props:
            continue
        props = by_name.get(node.name) or next(
            (by_output[o] for o in node.output if o in by_output), None)
        if props is not None:
            node.metadata_props.extend(props)


def _to_fp16(proto):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(proto, keep_io_types=True)


def _save(proto, path: Path, data_name: str, external: bool) -> None:
    import onnx

    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))


def _needs_external(module: nn.Module, fp16: bool, external_data: bool | str) -> bool:
    if external_data == "auto":
        nbytes = sum(t.numel() * (2 if fp16 else t.element_size())
                     for t in list(module.parameters()) + list(module.buffers()))
        return nbytes > PROTOBUF_LIMIT * 0.9  # margin for the graph itself
    if not isinstance(external_data, bool):
        raise InvalidArgumentError(f"external_data must be True, False or 'auto', "
                                   f"got {external_data!r}")
    return external_data


def export_onnx(module: nn.Module, example_inputs: tuple, out_path: str | Path, *,
                input_names: Sequence[str], output_names: Sequence[str], opset: int = 20,
                simplify: bool = True, fp16: bool = False, external_data: bool | str = "auto",
                overwrite: bool = False, dynamic_shapes=None) -> OnnxResult:
    """Export ``module`` to ONNX at ``out_path`` (``.onnx``), all or nothing.

    Static shapes from ``example_inputs`` unless ``dynamic_shapes`` (torch.export's form, one
    entry per input) makes axes dynamic; inputs/outputs named as given. ``external_data``:
    ``"auto"`` moves weights to ``<name>.onnx.data`` when they approach 2 GB.
    """
    from mobile_sd.utils.env import PeakRss
    from mobile_sd.utils.staging import staged

    out_path, example_inputs = Path(out_path), tuple(example_inputs)
    if out_path.suffix != ".onnx":
        raise InvalidArgumentError(f"out_path must end in .onnx, got {out_path}")
    if len(input_names) != len(example_inputs):
        raise InvalidArgumentError(f"{len(input_names)} input names for "
                                   f"{len(example_inputs)} inputs")
    external = _needs_external(module, fp16, external_data)
    data_name = f"{out_path.name}.data"
    destinations = {"onnx": out_path}
    if external:
        destinations["data"] = out_path.with_name(data_name)
    notes: list[str] = []
    start = time.perf_counter()
    with PeakRss() as rss, staged(destinations, overwrite) as stage, torch.no_grad():
        proto = _to_proto(module.eval(), example_inputs, input_names, output_names, opset,
                          dynamic_shapes)
        _check_names(proto, input_names, output_names)
        simplified = False
        if simplify:
            proto, simplified = _simplify(proto, notes)
        if fp16:
            proto = _to_fp16(proto)
        _save(proto, stage.path("onnx"), data_name, external)
    return OnnxResult(
        path=str(stage.destinations["onnx"]), input_names=list(input_names),
        output_names=list(output_names), opset=opset, fp16=fp16, simplified=simplified,
        node_count=len(proto.graph.node),
        export_seconds=round(time.perf_counter() - start, 2), peak_rss_mb=round(rss.peak_mb, 1),
        data_path=str(stage.destinations["data"]) if external else None, notes=notes,
        dynamic_axes=dynamic_axes(proto))


def run_onnx(path: str | Path, inputs: Sequence,
             num_threads: int | None = None) -> list[np.ndarray]:
    """Run an ONNX model with onnxruntime's CPU provider; inputs in graph order.

    Tensors or numpy arrays are accepted; outputs are numpy arrays in graph order.
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"{path}: no such .onnx file")
    options = ort.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if len(inputs) != len(names):
        raise InvalidArgumentError(f"{path.name} takes {len(names)} inputs ({names}), "
                                   f"got {len(inputs)}")
    feed = {name: (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
            for name, x in zip(names, inputs)}
    return session.run(None, feed)
