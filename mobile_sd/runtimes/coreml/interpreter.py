"""Execute a MIL program op by op with the torch kernels of :mod:`.kernels`.

Modes:
  ``typed``  every var the program types fp16 is rounded to fp16 after the op that makes it
             (kernels compute in fp32, like a GPU with fp32 accumulators; the value stored
             between ops is exactly an fp16 value, so overflow -> inf and underflow -> 0 appear);
  ``fp32``   fp16 vars are kept in fp32 (separates conversion error from fp16 loss).
Float activations are held in fp32 tensors in both modes (in typed mode they hold fp16
values); typed mode stores fp16 consts (weights) as fp16 and widens them when an op reads them.
An activation is dropped after the last op that reads it (``PreparedProgram.frees``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch

from mobile_sd.runtimes.coreml.errors import MilRuntimeError, UnsupportedMilOpError
from mobile_sd.runtimes.coreml.kernels import REGISTRY

MODES = ("typed", "fp32")
_INT_DTYPES = {"int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16,
               "int32": torch.int32, "int64": torch.int64, "uint16": torch.int32,
               "uint32": torch.int64, "uint64": torch.int64, "bool": torch.bool}


# Ops that only move / pick values: given fp16-valued inputs their outputs are fp16 values
# already, so typed mode skips the (exact, no-op) rounding.
_MOVES = frozenset({"reshape", "transpose", "expand_dims", "squeeze", "slice_by_index",
                    "slice_by_size", "split", "concat", "stack", "tile", "gather",
                    "gather_along_axis", "gather_nd", "select", "identity", "flatten2d",
                    "upsample_nearest_neighbor", "relu", "maximum", "minimum"})


@dataclass(frozen=True)
class OpInfo:
    """One executed op, for divergence locators: name, type, outputs and a source hint."""
    name: str
    op_type: str
    outputs: tuple[str, ...]
    weights: tuple[str, ...] = ()
    hint: str = ""                  # torch module path guessed from the weight names, if any
    inputs: tuple[str, ...] = ()    # non-const input var names (activations)


@dataclass
class _Step:
    op: object
    kernel: object
    inputs: list                    # (arg name, var name | [var names])
    outputs: list                   # (var name, dtype string)
    rounds: bool = True             # typed mode: round fp16 outputs (False: already fp16 values)


@dataclass
class PreparedProgram:
    """A MIL function ready to run: consts (and expanded constexprs) as torch tensors."""
    mode: str
    input_vars: dict
    output_names: list[str]
    consts: dict = field(default_factory=dict)
    steps: list = field(default_factory=list)
    ops: list = field(default_factory=list)
    # frees[i]: activation vars whose last reader is step i, dropped right after it runs so a
    # full-size UNet call holds only its live activations, not every intermediate (GBs).
    frees: list = field(default_factory=list)


def dtype_name(mil_dtype) -> str:
    from coremltools.converters.mil.mil import types
    return types.builtin_to_string(mil_dtype)


def to_torch(value):
    """A const's value (numpy / numpy scalar / python) as a torch tensor (str stays str)."""
    if isinstance(value, (str, bytes)) or value is None:
        return value
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
        return list(value)
    arr = np.asarray(value)
    if arr.dtype == np.float16 or arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    elif arr.dtype in (np.uint16, np.uint32, np.uint64, np.int64):
        arr = arr.astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(arr))


def convert(t, name: str, mode: str):
    """Store ``t`` as a var of MIL dtype ``name`` in ``mode`` (the one rounding point)."""
    if not isinstance(t, torch.Tensor):
        return t
    if name == "fp16":
        t = t.to(torch.float32)
        return t.to(torch.float16).to(torch.float32) if mode == "typed" else t
    if name in ("fp32", "fp64"):
        return t.to(torch.float32)
    if name in _INT_DTYPES:
        return t.to(_INT_DTYPES[name])
    return t            # sub-byte ints (int4/uint4/...): keep what the loader gave


_WEIGHT_SUFFIX = re.compile(r"_(weight|bias|gamma|beta)(_to_fp16|_to_fp32)?(_.*)?$")


def source_hint(weights) -> str:
    for w in weights:
        if w.startswith("p_") or "weight" in w:
            return _WEIGHT_SUFFIX.sub("", w[2:] if w.startswith("p_") else w)
    return ""


def prepare(function, mode: str = "typed", path=None, recipe: str | None = None) -> PreparedProgram:
    """Resolve kernels, load consts and expand constexpr ops; unknown op types raise here."""
    if mode not in MODES:
        raise MilRuntimeError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    prep = PreparedProgram(mode=mode, input_vars=dict(function.inputs),
                           output_names=[v.name for v in function.outputs])
    produced = set(function.inputs)
    for op in function.operations:
        if op.op_type == "const":
            out = op.outputs[0]
            prep.consts[out.name] = _stored(convert(to_torch(out.val), dtype_name(out.dtype),
                                                    mode), dtype_name(out.dtype), mode) \
                if not isinstance(out.val, str) else out.val
            produced.add(out.name)
            continue
        kernel = REGISTRY.get(op.op_type)
        if kernel is None:
            raise UnsupportedMilOpError(op.op_type, op.name, path, recipe)
        inputs = []
        for arg, var in op.inputs.items():
            group = list(var) if isinstance(var, (list, tuple)) else [var]
            for v in group:            # default inputs filled in by coremltools' op classes
                if v.name not in produced and v.val is not None:
                    prep.consts[v.name] = to_torch(v.val)
                    produced.add(v.name)
            names = [v.name for v in group]
            inputs.append((arg, names if isinstance(var, (list, tuple)) else names[0]))
        outputs = [(v.name, dtype_name(v.dtype)) for v in op.outputs]
        produced.update(name for name, _ in outputs)
        step = _Step(op, kernel, inputs, outputs, rounds=not _moves_fp16(op))
        weights = tuple(n for _, n in inputs if isinstance(n, str) and n in prep.consts
                        and isinstance(prep.consts[n], torch.Tensor) and prep.consts[n].numel() > 1)
        if op.op_type.startswith("constexpr_"):
            values = _execute(step, prep.consts, mode, path)
            for (name, dtype), value in zip(outputs, values):
                prep.consts[name] = _stored(value, dtype, mode)
            continue
        prep.steps.append(step)
        acts = tuple(n for _, ref in inputs for n in (ref if isinstance(ref, list) else [ref])
                     if n not in prep.consts)
        prep.ops.append(OpInfo(op.name, op.op_type, tuple(n for n, _ in outputs), weights,
                               source_hint(weights), acts))
    prep.frees = _last_uses(prep)
    return prep


def _last_uses(prep: PreparedProgram) -> list[list[str]]:
    last: dict[str, int] = {}
    for i, step in enumerate(prep.steps):
        for _, ref in step.inputs:
            for name in (ref if isinstance(ref, list) else [ref]):
                if name not in prep.consts:
                    last[name] = i
    keep = set(prep.output_names)
    frees: list[list[str]] = [[] for _ in prep.steps]
    for name, i in last.items():
        if name not in keep:
            frees[i].append(name)
    return frees


def _stored(value, dtype: str, mode: str):
    """A const as kept between calls: in typed mode an fp16 var holds exact fp16 values, so
    it is stored as fp16 (half the memory: 1.7 GB instead of 3.4 GB for a full-size UNet) and
    widened back to fp32, exactly, when an op reads it (:func:`_execute`)."""
    if mode == "typed" and dtype == "fp16" and isinstance(value, torch.Tensor) \
            and value.dtype == torch.float32:
        return value.to(torch.float16)
    return value


def _widened(value):
    if isinstance(value, torch.Tensor) and value.dtype == torch.float16:
        return value.to(torch.float32)
    return value


def _moves_fp16(op) -> bool:
    if op.op_type not in _MOVES:
        return False
    names = {dtype_name(v.dtype) for v in op.outputs}
    for var in op.inputs.values():
        for v in (var if isinstance(var, (list, tuple)) else [var]):
            name = dtype_name(v.dtype)
            if name in ("fp32", "fp64"):
                return False
    return names <= {"fp16"}


def _execute(step: _Step, env: dict, mode: str, path=None) -> list:
    args = {}
    for arg, ref in step.inputs:
        args[arg] = [_widened(env[n]) for n in ref] if isinstance(ref, list) \
            else _widened(env[ref])
    try:
        result = step.kernel(step.op, args)
    except MilRuntimeError:
        raise
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MilRuntimeError(f"{path or 'MIL program'}: op '{step.op.name}' "
                              f"({step.op.op_type}) failed: {msg}") from exc
    if not isinstance(result, (list, tuple)):
        result = (result,)
    if not step.rounds:      # contiguous like a rounded copy: torch's strided kernels can
        result = [t.contiguous() if isinstance(t, torch.Tensor) else t for t in result]
        mode = "fp32"        # differ from contiguous ones in the last fp32 bit
    return [convert(t, dt, mode) for t, (_, dt) in zip(result, step.outputs)]


def run_prepared(prep: PreparedProgram, inputs: dict, record: bool = False, path=None):
    """Run a prepared program. Returns ``outputs`` or ``(outputs, recorded)`` if ``record``."""
    env = dict(prep.consts)
    missing = [n for n in prep.input_vars if n not in inputs]
    if missing:
        raise MilRuntimeError(f"{path or 'MIL program'}: missing input(s) {', '.join(missing)}; "
                              f"the program takes {', '.join(prep.input_vars)}")
    for name, var in prep.input_vars.items():
        value = inputs[name]
        t = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
        shape = tuple(var.shape)
        if all(isinstance(d, int) for d in shape) and tuple(t.shape) != shape:
            raise MilRuntimeError(f"{path or 'MIL program'}: input '{name}' has shape "
                                  f"{tuple(t.shape)}, the program expects {shape}")
        env[name] = convert(t, dtype_name(var.dtype), prep.mode)
    recorded = {n: env[n] for n in prep.input_vars} if record else None
    with torch.no_grad():
        for step, dead in zip(prep.steps, prep.frees):
            for (name, _), value in zip(step.outputs, _execute(step, env, prep.mode, path)):
                env[name] = value
                if record:
                    recorded[name] = value
            for name in dead:
                env.pop(name, None)
    outputs = {name: env[name] for name in prep.output_names}
    return (outputs, recorded) if record else outputs


def run_program(program, inputs: dict, mode: str = "typed", record: bool = False,
                path=None, recipe: str | None = None):
    """Run a MIL ``Program`` (or its function) on ``inputs`` (name -> tensor/array).

    Returns ``{output name: tensor}``; with ``record=True`` returns ``(outputs, recorded)``
    where ``recorded`` maps the inputs and every op output name to its value, in execution order.
    """
    function = program.functions["main"] if hasattr(program, "functions") else program
    return run_prepared(prepare(function, mode, path, recipe), inputs, record, path)
