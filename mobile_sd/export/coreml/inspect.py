"""Read a saved Core ML ML Program (``.mlpackage``) on Linux: I/O, op types, compression.

Core ML cannot run here (``MLModel.predict`` is macOS-only), but a package is a protobuf spec
plus a weight file, and both can be read without a runtime: everything below works on
``ct.models.MLModel(path, skip_model_load=True).get_spec()`` (or on an in-memory ``MLModel``
straight from ``ct.convert``, or on a bare ``Model_pb2.Model`` spec).

Where things live in the spec (``Model.mlProgram``; see ``coremltools/proto/MIL_pb2``)::

    functions["main"].block_specializations[opset].operations[i]
        .type                      "conv", "const", "constexpr_lut_to_dense", ...
        .inputs[key].arguments[j]  a var name, or an inline Value (iOS18 constexpr ops)
        .attributes[key]           Values: a const's "val"; the iOS16 constexpr ops' inputs
        .outputs[k].type           ValueType.tensorType: dataType, rank, dimensions
        .blocks                    nested blocks (cond, while_loop)
    Value = immediateValue (small, inline)
          | blobFileValue ("@model_path/weights/weight.bin", offset of a 64-byte blob header)

Example (not run by the tests: it needs real artifacts)::

    describe_io("unet.mlpackage")["outputs"]
    # -> [{'name': 'noise_pred', 'shape': [1, 4, 64, 64], 'dtype': 'float16', 'flexible': None}]
    check_structure("unet.mlpackage", io, {"palettize": 1, "lut_nbits": 4})
    # -> []
"""
from __future__ import annotations

import math
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from mobile_sd.errors import ExportError, InvalidArgumentError
from mobile_sd.utils.files import size_bytes

# The three weight-compression ops of coremltools.optimize.coreml (always reported, 0 if absent).
COMPRESSION_OPS = ("constexpr_lut_to_dense", "constexpr_affine_dequantize",
                   "constexpr_blockwise_shift_scale")
# What a recipe calls a compression -> the ops that implement it (any of them counts).
COMPRESSION_ALIASES = {
    "palettize": ("constexpr_lut_to_dense",),
    "linear_quantize": ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale"),
    "prune": ("constexpr_sparse_to_dense",),
}
_ARRAY_DTYPES = {"FLOAT16": "float16", "FLOAT32": "float32", "DOUBLE": "float64",
                 "INT32": "int32", "INT8": "int8"}
_NUMPY_DTYPES = {"float16": "<f2", "float32": "<f4", "float64": "<f8", "bfloat16": None,
                 "int8": "i1", "uint8": "u1", "int16": "<i2", "uint16": "<u2", "int32": "<i4",
                 "uint32": "<u4", "int64": "<i8", "uint64": "<u8", "bool": "?"}
_DTYPE_BITS = {"bool": 8, "float8e4m3fn": 8, "float8e5m2": 8, "float16": 16, "bfloat16": 16,
               "float32": 32, "float64": 64, "int4": 4, "int8": 8, "int16": 16, "int32": 32,
               "int64": 64, "uint1": 1, "uint2": 2, "uint3": 3, "uint4": 4, "uint6": 6,
               "uint8": 8, "uint16": 16, "uint32": 32, "uint64": 64}
# Header of each blob in weight.bin (coremltools' MIL storage): sentinel, dtype, size, offset.
_BLOB_HEADER = struct.Struct("<IIQQ")
_BLOB_SENTINEL = 0xDEADBEEF


@dataclass(frozen=True)
class ValueInfo:
    """dtype and shape of one MIL value; a ``None`` dim is a flexible (unknown) size."""

    dtype: str                                  # "float16", "int32", "uint4", "string", ...
    shape: tuple[int | None, ...] | None        # None: not a tensor, or rank unknown
    kind: str = "tensor"                        # "tensor", "state", "listType", ...

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def numel(self) -> int | None:
        if self.shape is None or None in self.shape:
            return None
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Packed size in bytes (sub-byte types included); 0 when unknown."""
        bits = _DTYPE_BITS.get(self.dtype)
        return 0 if bits is None or self.numel is None else math.ceil(self.numel * bits / 8)


@dataclass(frozen=True)
class LutInfo:
    """What a ``constexpr_lut_to_dense`` op decodes: bits per index and how LUTs are shared."""

    nbits: int | None          # None when the spec does not say (unexpected LUT shape)
    num_luts: int              # 1 = per-tensor; > 1 = grouped-channel palettization
    group_size: int | None     # channels sharing one LUT along the grouped axis (None: per-tensor)


def value_info(value_type: Any) -> ValueInfo:
    """Decode a ``MIL_pb2.ValueType`` (tensor, or state wrapping a tensor)."""
    from coremltools.proto import MIL_pb2

    kind = value_type.WhichOneof("type")
    if kind == "stateType":
        inner = value_info(value_type.stateType.wrappedType)
        return ValueInfo(inner.dtype, inner.shape, "state")
    if kind != "tensorType":
        return ValueInfo(kind or "unknown", None, kind or "unknown")
    tensor = value_type.tensorType
    dtype = MIL_pb2.DataType.Name(tensor.dataType).lower()
    if tensor.rank < 0 or len(tensor.dimensions) != tensor.rank:
        return ValueInfo(dtype, None)
    dims = tuple(d.constant.size if d.WhichOneof("dimension") == "constant" else None
                 for d in tensor.dimensions)
    return ValueInfo(dtype, dims)


def immediate_value(value: Any) -> np.ndarray | None:
    """The numpy value of an inline ``MIL_pb2.Value``; None for blobs and sub-byte types."""
    if value.WhichOneof("value") != "immediateValue":
        return None
    if value.immediateValue.WhichOneof("value") != "tensor":
        return None
    info = value_info(value.type)
    tensor = value.immediateValue.tensor
    which = tensor.WhichOneof("value")
    if which is None:
        return None
    if which == "bytes":
        np_dtype = _NUMPY_DTYPES.get(info.dtype)
        if np_dtype is None:
            return None
        array = np.frombuffer(tensor.bytes.values, dtype=np_dtype)
    else:
        array = np.array(list(getattr(tensor, which).values))
    if info.numel is not None and array.size == info.numel:
        array = array.reshape(info.shape)
    return array


def is_const_op(op: Any) -> bool:
    """A ``const`` or a ``constexpr_*`` (weights decompressed at load time)."""
    return op.type == "const" or op.type.startswith("constexpr_")


@dataclass
class MilGraph:
    """An index over the main function of an ML Program: types, producers and consumers."""

    spec: Any
    root: Path | None              # the folder "@model_path" names (Data/com.apple.CoreML)
    label: str                     # path or "<MLModel>", for messages
    function: str
    ops: list = field(default_factory=list)                   # nested blocks included
    types: dict[str, ValueInfo] = field(default_factory=dict)
    producers: dict[str, Any] = field(default_factory=dict)
    consumers: dict[str, list] = field(default_factory=dict)
    inputs: dict[str, ValueInfo] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()

    def bindings(self, op: Any, key: str) -> list:
        """The arguments of ``op[key]``: var names (str) or inline ``Value`` protos."""
        if key in op.inputs:
            return [arg.name if arg.WhichOneof("binding") == "name" else arg.value
                    for arg in op.inputs[key].arguments]
        if key in op.attributes:
            return [op.attributes[key]]
        return []

    def info(self, binding: Any) -> ValueInfo | None:
        if isinstance(binding, str):
            return self.types.get(binding)
        return value_info(binding.type)

    def arg_info(self, op: Any, key: str) -> ValueInfo | None:
        found = self.bindings(op, key)
        return self.info(found[0]) if found else None

    def const_value(self, op: Any, key: str) -> np.ndarray | None:
        """The value of a const argument stored inline (shapes, eps, strides); else None."""
        found = self.bindings(op, key)
        if not found:
            return None
        binding = found[0]
        if isinstance(binding, str):
            producer = self.producers.get(binding)
            if producer is None or producer.type != "const" or "val" not in producer.attributes:
                return None
            binding = producer.attributes["val"]
        return immediate_value(binding)

    def is_const(self, binding: Any) -> bool:
        if not isinstance(binding, str):
            return True
        producer = self.producers.get(binding)
        return producer is not None and is_const_op(producer)

    def producer_type(self, binding: Any) -> str | None:
        producer = self.producers.get(binding) if isinstance(binding, str) else None
        return None if producer is None else producer.type

    def tensor_args(self, op: Any) -> Iterator[tuple[str, Any, ValueInfo]]:
        """(key, binding, info) for every tensor argument of ``op`` (not its name attribute)."""
        keys = list(op.inputs) + [k for k in op.attributes if k != "name"]
        for key in keys:
            for binding in self.bindings(op, key):
                info = self.info(binding)
                if info is not None and info.shape is not None:
                    yield key, binding, info


def load_graph(model: Any) -> MilGraph:
    """Index the main function of ``model``: a package path, an ``MLModel``, a spec, or a graph."""
    if isinstance(model, MilGraph):
        return model
    spec, root, label = _load_spec(model)
    name, function = _main_function(spec, label)
    graph = MilGraph(spec=spec, root=root, label=label, function=name)
    for named in function.inputs:
        graph.inputs[named.name] = graph.types[named.name] = value_info(named.type)
    block = function.block_specializations[function.opset]
    graph.outputs = tuple(block.outputs)
    _index_block(graph, block)
    return graph


def _load_spec(model: Any) -> tuple[Any, Path | None, str]:
    if hasattr(model, "mlProgram") and hasattr(model, "description"):   # a Model_pb2.Model
        return model, None, "<spec>"
    if hasattr(model, "get_spec"):                                      # ct.models.MLModel
        weights = getattr(model, "weights_dir", None)
        label = str(getattr(model, "package_path", None) or "<MLModel>")
        return model.get_spec(), Path(weights).parent if weights else None, label
    if not isinstance(model, (str, os.PathLike)):
        raise InvalidArgumentError(
            f"expected an .mlpackage path, a ct.models.MLModel or a Model spec, got "
            f"{type(model).__name__}; convert a MIL Program first with "
            "ct.convert(prog, convert_to='mlprogram')")
    path = Path(model)
    if not path.exists():
        raise ExportError(f"{path}: no such Core ML model; export it first or fix the path")
    import coremltools as ct

    try:
        spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    except Exception as exc:  # coremltools raises bare Exceptions for corrupt packages
        raise ExportError(f"{path}: not a readable Core ML model ({exc}); re-export it") from exc
    root = path / "Data" / "com.apple.CoreML" if path.is_dir() else None
    return spec, root, str(path)


def _main_function(spec: Any, label: str) -> tuple[str, Any]:
    kind = spec.WhichOneof("Type")
    if kind != "mlProgram":
        raise ExportError(f"{label}: is a {kind} model, not an ML Program; these checks read ML "
                          "Programs only: convert with convert_to='mlprogram'")
    functions = spec.mlProgram.functions
    name = spec.description.defaultFunctionName or "main"
    if name not in functions and len(functions) == 1:
        name = next(iter(functions))
    if name not in functions:
        raise ExportError(f"{label}: no function {name!r}; functions: {sorted(functions)}")
    return name, functions[name]


def _index_block(graph: MilGraph, block: Any) -> None:
    for named in block.inputs:                  # loop variables of nested blocks
        graph.types[named.name] = value_info(named.type)
    for op in block.operations:
        graph.ops.append(op)
        for out in op.outputs:
            graph.types[out.name] = value_info(out.type)
            graph.producers[out.name] = op
        for key in op.inputs:
            for binding in graph.bindings(op, key):
                if isinstance(binding, str):
                    graph.consumers.setdefault(binding, []).append(op)
        for nested in op.blocks:
            _index_block(graph, nested)


# --- weights ----------------------------------------------------------------------------------

def _values(op: Any) -> Iterator[Any]:
    """Every ``Value`` stored on ``op``: its attributes and inline input arguments."""
    for key, value in op.attributes.items():
        if key != "name":
            yield value
    for argument in op.inputs.values():
        for arg in argument.arguments:
            if arg.WhichOneof("binding") == "value":
                yield arg.value


def _blob_size(graph: MilGraph, blob: Any, info: ValueInfo) -> int:
    """Size recorded in the blob's header in weight.bin; the type's packed size if unreadable."""
    if graph.root is not None:
        path = graph.root / blob.fileName.replace("@model_path/", "", 1)
        try:
            with open(path, "rb") as handle:
                handle.seek(blob.offset)
                sentinel, _, size, _ = _BLOB_HEADER.unpack(handle.read(_BLOB_HEADER.size))
            if sentinel == _BLOB_SENTINEL:
                return size
        except (OSError, struct.error):
            pass
    return info.nbytes


def weight_bytes(model: Any) -> int:
    """Bytes of all const / constexpr data (blobs counted once, as stored, plus inline values)."""
    graph = load_graph(model)
    seen: set[tuple[str, int]] = set()
    total = 0
    for op in graph.ops:
        if not is_const_op(op):
            continue
        for value in _values(op):
            info = value_info(value.type)
            if value.WhichOneof("value") == "blobFileValue":
                key = (value.blobFileValue.fileName, value.blobFileValue.offset)
                if key not in seen:
                    seen.add(key)
                    total += _blob_size(graph, value.blobFileValue, info)
            elif info.kind == "tensor" and info.dtype != "string":
                total += info.nbytes
    return total


def weight_file_bytes(model: Any) -> int:
    """Size on disk of the package's weights folder (0 for a bare spec)."""
    graph = load_graph(model)
    weights = graph.root / "weights" if graph.root else None
    return size_bytes(weights) if weights is not None and weights.is_dir() else 0


# --- I/O --------------------------------------------------------------------------------------

def describe_io(model: Any) -> dict[str, list[dict]]:
    """Inputs and outputs as ``{"inputs": [{name, shape, dtype, flexible}], "outputs": [...]}``.

    ``shape`` is the default shape (``None`` dims: flexible); ``flexible`` is ``None``,
    ``{"range": [[lo, hi], ...]}`` (RangeDim; hi -1 = unbounded) or ``{"enumerated": [...]}``.
    Stateful models also get ``"states"``.
    """
    graph = load_graph(model)
    desc = _description(graph)
    io = {"inputs": [_feature(f, graph) for f in desc.input],
          "outputs": [_feature(f, graph) for f in desc.output]}
    if len(desc.state):
        io["states"] = [_feature(f, graph) for f in desc.state]
    return io


def _description(graph: MilGraph) -> Any:
    desc = graph.spec.description
    for function in desc.functions:             # multifunction packages
        if function.name == graph.function:
            return function
    return desc


def _feature(feature: Any, graph: MilGraph) -> dict:
    from coremltools.proto import FeatureTypes_pb2

    kind = feature.type.WhichOneof("Type")
    entry = {"name": feature.name, "shape": None, "dtype": kind, "flexible": None}
    array = None
    if kind == "multiArrayType":
        array = feature.type.multiArrayType
    elif kind == "stateType":
        array = feature.type.stateType.arrayType
    elif kind == "imageType":
        image = feature.type.imageType
        gray = image.colorSpace in (FeatureTypes_pb2.ImageFeatureType.GRAYSCALE,
                                    FeatureTypes_pb2.ImageFeatureType.GRAYSCALE_FLOAT16)
        entry.update(dtype="image", shape=[1, 1 if gray else 3, image.height, image.width])
    if array is not None:
        name = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(array.dataType)
        mil = graph.types.get(feature.name)     # outputs often have no shape in the description
        shape = list(array.shape) or (list(mil.shape) if mil and mil.shape is not None else None)
        entry.update(dtype=_ARRAY_DTYPES.get(name, name.lower()), shape=shape,
                     flexible=_flexibility(array))
    return entry


def _flexibility(array: Any) -> dict | None:
    which = array.WhichOneof("ShapeFlexibility")
    if which == "shapeRange":
        ranges = [[r.lowerBound, r.upperBound] for r in array.shapeRange.sizeRanges]
        return {"range": ranges} if any(lo != hi for lo, hi in ranges) else None
    if which == "enumeratedShapes":
        return {"enumerated": [list(s.shape) for s in array.enumeratedShapes.shapes]}
    return None


# --- ops and compression ----------------------------------------------------------------------

def op_histogram(model: Any) -> dict[str, int]:
    """Count of MIL op types in the main function (nested blocks included), most frequent first."""
    return dict(Counter(op.type for op in load_graph(model).ops).most_common())


def lut_info(graph: MilGraph, op: Any) -> LutInfo:
    """nbits and LUT sharing of a ``constexpr_lut_to_dense`` op (iOS16 or iOS18 form)."""
    lut, indices = graph.arg_info(op, "lut"), graph.arg_info(op, "indices")
    if lut is None or not lut.shape:
        return LutInfo(None, 1, None)
    if len(lut.shape) == 1:     # iOS16 form: one LUT of 2^nbits entries; indices packed in uint8
        return LutInfo(_log2(lut.shape[0]), 1, None)
    # iOS18 form: lut [*groups, 2^nbits, vector_size]; indices uint<nbits> shaped like the weight.
    nbits = None
    if indices is not None and indices.dtype.startswith("uint"):
        nbits = _DTYPE_BITS.get(indices.dtype)
    nbits = nbits or _log2(lut.shape[-2])
    per_axis = lut.shape[:-2]
    groups = []
    if indices is not None and indices.shape is not None:
        groups = [dim // n for dim, n in zip(indices.shape, per_axis) if n and n > 1 and dim]
    return LutInfo(nbits, math.prod(n or 1 for n in per_axis), min(groups) if groups else None)


def _log2(n: int | None) -> int | None:
    return int(math.log2(n)) if n and n & (n - 1) == 0 else None


def compression_ops(model: Any) -> dict:
    """Count of each ``constexpr_*`` op, plus ``"lut_nbits": {nbits: count}`` for LUT ops.

    Example (not run by the tests: it needs real artifacts)::

        compression_ops("unet.mlpackage")
        # -> {'constexpr_lut_to_dense': 250, 'constexpr_affine_dequantize': 0,
        # -> 'constexpr_blockwise_shift_scale': 0, 'lut_nbits': {6: 250}}
    """
    graph = load_graph(model)
    counts: dict = {name: 0 for name in COMPRESSION_OPS}
    nbits: Counter = Counter()
    for op in graph.ops:
        if op.type.startswith("constexpr_"):
            counts[op.type] = counts.get(op.type, 0) + 1
        if op.type == "constexpr_lut_to_dense":
            nbits[lut_info(graph, op).nbits] += 1
    counts["lut_nbits"] = dict(sorted(nbits.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)))
    return counts


# --- structure checks -------------------------------------------------------------------------

def check_structure(model: Any, expected_io: Mapping | None,
                    expected_compression: Mapping | None = None) -> list[str]:
    """Problems between a package and its manifest entry (empty list: all as expected).

    ``expected_io`` has the form :func:`describe_io` returns (``flexible`` is ignored; a
    ``None`` shape or dim matches anything; a side left out, e.g. no ``"outputs"``, is not
    checked). ``expected_compression`` maps a compression (``"palettize"``,
    ``"linear_quantize"``, ``"prune"`` or a ``constexpr_*`` op type) to the minimum number of
    ops that must implement it, and ``"lut_nbits"`` to the bits every LUT must
    have, e.g. ``{"palettize": 1, "lut_nbits": 4}``.
    """
    graph = load_graph(model)
    problems: list[str] = []
    if expected_io:
        actual = describe_io(graph)
        for side in (s for s in ("inputs", "outputs") if s in expected_io):
            problems += _compare_io(side, expected_io[side], actual[side])
    if expected_compression:
        problems += _compare_compression(expected_compression, compression_ops(graph))
    return problems


def assert_structure(model: Any, expected_io: Mapping | None,
                     expected_compression: Mapping | None = None) -> None:
    """:func:`check_structure`, raising :class:`ExportError` that lists every problem."""
    graph = load_graph(model)
    problems = check_structure(graph, expected_io, expected_compression)
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise ExportError(f"{graph.label}: the package does not match its manifest entry:\n"
                          f"{listed}\nRe-export it, or update the manifest if the change is "
                          "intended")


def _compare_io(side: str, expected: list, actual: list) -> list[str]:
    what = side[:-1]
    for entry in expected:
        if not isinstance(entry, Mapping) or "name" not in entry:
            raise InvalidArgumentError(f"expected_io[{side!r}]: each entry needs a 'name' "
                                       f"(and optionally 'shape', 'dtype'); got {entry!r}")
    have = {f["name"]: f for f in actual}
    want = {f["name"]: f for f in expected}
    problems = [f"{what} {name!r} is missing (the package has {sorted(have)})"
                for name in want if name not in have]
    problems += [f"unexpected {what} {name!r} (the manifest lists {sorted(want)})"
                 for name in have if name not in want]
    for name in (n for n in want if n in have):
        w, h = want[name], have[name]
        if not _shape_matches(w.get("shape"), h["shape"]):
            problems.append(f"{what} {name!r}: shape {h['shape']} differs from the manifest's "
                            f"{list(w['shape'])}")
        if w.get("dtype") and w["dtype"] != h["dtype"]:
            problems.append(f"{what} {name!r}: dtype {h['dtype']} differs from the manifest's "
                            f"{w['dtype']}")
    return problems


def _shape_matches(want: Any, have: Any) -> bool:
    if want is None:
        return True
    if have is None or len(want) != len(have):
        return False
    return all(w is None or w == h for w, h in zip(want, have))


def _compare_compression(expected: Mapping, actual: dict) -> list[str]:
    problems = []
    for key, minimum in expected.items():
        if key == "lut_nbits":
            continue
        ops = COMPRESSION_ALIASES.get(key) or ((key,) if key.startswith("constexpr_") else None)
        if ops is None:
            raise InvalidArgumentError(
                f"expected_compression: unknown key {key!r}; valid keys: "
                f"{', '.join(sorted(COMPRESSION_ALIASES))}, lut_nbits, or a constexpr_* op type")
        found = sum(actual.get(op, 0) for op in ops)
        if found < int(minimum):
            problems.append(f"compression {key!r} is missing: expected at least {int(minimum)} "
                            f"{' / '.join(ops)} op(s), found {found}")
    if "lut_nbits" in expected:
        problems += _compare_lut_nbits(int(expected["lut_nbits"]), actual["lut_nbits"])
    return problems


def _compare_lut_nbits(want: int, found: dict) -> list[str]:
    if not found:
        return [f"expected {want}-bit LUTs but the package has no constexpr_lut_to_dense op"]
    wrong = {bits: n for bits, n in found.items() if bits != want}
    if wrong:
        return [f"expected every LUT to be {want}-bit, found {wrong} (nbits: count)"]
    return []

