"""PT2E int8 quantization for ExecuTorch/XNNPACK (torchao's ``prepare_pt2e``/``convert_pt2e``).

- :func:`quantize_pt2e_static`: int8 activations and weights (per-channel), calibrated on
  user samples; modules named in ``fp32_fallback`` stay fp32.
- :func:`quantize_pt2e_dynamic_linear`: int8 dynamic activations, int8 weights, Linear only.
  (Dynamic int8 set globally fails in XNNPACK's ``ChannelsLastTaggedReshapePass`` on a UNet.)
- :func:`layer_sensitivity`: output SQNR when one candidate module alone is kept fp32 (or is
  alone quantized), so a recipe can choose its fallback list from data.

``torch.ao.quantization.quantize_pt2e`` is gone in torch 2.13; PT2E lives in
``torchao.quantization.pt2e``. The quantizer is executorch's ``XNNPACKQuantizer``.

Example (not run by the tests: it needs real artifacts)::

    ep = quantize_pt2e_static(unet, example, calibration=samples,
                              fp32_fallback=["conv_in", "conv_out"])
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from mobile_sd.errors import CalibrationError, InvalidArgumentError
from mobile_sd.utils.env import release_freed_memory


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """SQNR of ``test`` against ``reference`` in dB (unbounded: layers are ranked by it)."""
    from mobile_sd.metrics import sqnr_db as metric

    return metric(reference, test, cap=math.inf)


def _input_name(names: Sequence[str] | None, i: int) -> str:
    return f"'{names[i]}'" if names and i < len(names) else f"#{i}"


def check_sample(sample, example_inputs: tuple, index: int,
                 input_names: Sequence[str] | None = None) -> tuple:
    """Return ``sample`` as a tuple if it matches the example inputs, else CalibrationError."""
    sample = tuple(sample) if isinstance(sample, (tuple, list)) else (sample,)
    if len(sample) != len(example_inputs):
        raise CalibrationError(f"calibration sample {index} has {len(sample)} inputs, the "
                               f"component takes {len(example_inputs)}")
    for i, (got, want) in enumerate(zip(sample, example_inputs)):
        if not isinstance(got, torch.Tensor):
            raise CalibrationError(f"calibration sample {index}, input "
                                   f"{_input_name(input_names, i)}: expected a tensor, got "
                                   f"{type(got).__name__}")
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            raise CalibrationError(
                f"calibration sample {index}, input {_input_name(input_names, i)}: shape "
                f"{tuple(got.shape)} {got.dtype} does not match the example input "
                f"{tuple(want.shape)} {want.dtype}; exports have static shapes, so calibrate "
                "with samples of exactly the export shapes")
    return sample


def calibrate(prepared: Callable, example_inputs: tuple, calibration: Iterable,
              input_names: Sequence[str] | None) -> int:
    """Feed every calibration sample (checked) to a prepared model; returns how many."""
    if calibration is None:
        raise CalibrationError("int8 static quantization needs calibration samples "
                               "(an iterable of input tuples); none were given")
    count = 0
    with torch.no_grad():
        for count, sample in enumerate(calibration, start=1):
            prepared(*check_sample(sample, example_inputs, count - 1, input_names))
    if count == 0:
        raise CalibrationError("calibration is empty: give at least one input tuple "
                               "(a few dozen representative samples is typical)")
    return count


def _graph_module(exported_or_module, example_inputs: tuple) -> torch.fx.GraphModule:
    if isinstance(exported_or_module, torch.export.ExportedProgram):
        return exported_or_module.module()
    return torch.export.export(exported_or_module, tuple(example_inputs)).module()


def _module_paths(node: torch.fx.Node) -> list[str]:
    paths = []
    for path, _ in node.meta.get("nn_module_stack", {}).values():
        paths.append(path[len("L['self']."):] if path.startswith("L['self'].") else path)
    return paths


def _check_names(gm: torch.fx.GraphModule, names: Sequence[str]) -> None:
    known = {p for n in gm.graph.nodes for p in _module_paths(n)}
    unknown = [n for n in names if n not in known]
    if unknown:
        sample = ", ".join(sorted(known, key=len)[:8])
        raise InvalidArgumentError(f"fp32_fallback names no module of this component: "
                                   f"{unknown}; module names look like: {sample}, ...")


def _is_grouped_conv_transpose(node: torch.fx.Node) -> bool:
    # XNNPACK cannot run per-channel quantized transposed convs with groups > 1 (e.g. the
    # nearest-upsample kernel of surgery.xnnpack_upsample): keep them fp32 so they delegate.
    if node.target is not torch.ops.aten.conv_transpose2d.input:
        return False
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    return groups != 1


def _in_norm(node: torch.fx.Node) -> bool:
    # Normalization statistics (the mul/add/sub of a GroupNorm or LayerNorm rewritten for
    # XNNPACK by mobile_sd.surgery) lose too much in int8: ops whose innermost module is a
    # *Norm stay fp32. Unlifted graphs store the class as a qualified-name string.
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return False
    cls = list(stack.values())[-1][1]
    return str(getattr(cls, "__name__", cls)).endswith("Norm")


_PERIODIC = (torch.ops.aten.sin.default, torch.ops.aten.cos.default)
_ARITHMETIC = (torch.ops.aten.mul.Tensor, torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor,
               torch.ops.aten.div.Tensor)


def _feeds_periodic(node: torch.fx.Node, depth: int = 4) -> bool:
    # Sinusoidal embeddings (timestep * frequency -> sin/cos): an int8 step of a phase that
    # spans hundreds of radians scrambles sin/cos. Measured on the tiny UNet: quantizing the
    # timestep projection costs ~6 dB of output SQNR. Arithmetic feeding sin/cos stays fp32.
    for user in node.users:
        if user.target in _PERIODIC:
            return True
        if depth and user.target in _ARITHMETIC and _feeds_periodic(user, depth - 1):
            return True
    return False


def _skip_filter(fp32_fallback: Sequence[str]) -> Callable[[torch.fx.Node], bool]:
    fallback, prefixes = set(fp32_fallback), tuple(f"{name}." for name in fp32_fallback)

    def keep_quantized(node: torch.fx.Node) -> bool:
        if _is_grouped_conv_transpose(node) or _in_norm(node) or _feeds_periodic(node):
            return False
        return not any(p in fallback or p.startswith(prefixes) for p in _module_paths(node))

    return keep_quantized


def quantize_pt2e_static(exported_or_module, example_inputs: tuple,
                         calibration: Iterable[tuple], fp32_fallback: Sequence[str] = (),
                         per_channel: bool = True,
                         input_names: Sequence[str] | None = None) -> torch.export.ExportedProgram:
    """int8 static PT2E quantization for XNNPACK; returns the re-exported quantized program.

    ``calibration`` yields input tuples with exactly the shapes/dtypes of ``example_inputs``
    (else :class:`CalibrationError`, naming the input and both shapes). ``fp32_fallback`` lists
    module names (as in ``named_modules()``) whose ops stay fp32, children included.
    ``XNNPACKQuantizer.set_module_name(name, None)`` asserts in executorch 1.5.1, so the
    fallback is a filter function over each node's ``nn_module_stack`` instead.

    Always left fp32, whatever the fallback list (each measured on tiny models):
    arithmetic feeding sin/cos (timestep sinusoid phase: -6 dB output SQNR when quantized),
    ops inside ``*Norm`` modules (normalization statistics: -1 to -3 dB), and grouped
    transposed convs (the upsample kernel; XNNPACK cannot run them per-channel quantized).
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer, get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    gm = _graph_module(exported_or_module, example_inputs)
    _check_names(gm, fp32_fallback)
    quantizer = XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=per_channel))
    quantizer.set_filter_function(_skip_filter(fp32_fallback))
    prepared = prepare_pt2e(gm, quantizer)
    calibrate(prepared, example_inputs, calibration, input_names)
    converted = convert_pt2e(prepared)
    return torch.export.export(converted, tuple(example_inputs))


def quantize_pt2e_dynamic_linear(exported_or_module,
                                 example_inputs: tuple) -> torch.export.ExportedProgram:
    """int8 dynamic-activation / int8 per-channel weight quantization of Linear layers only."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer, get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    gm = _graph_module(exported_or_module, example_inputs)
    quantizer = XNNPACKQuantizer().set_module_type(
        nn.Linear, get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True))
    prepared = prepare_pt2e(gm, quantizer)
    with torch.no_grad():
        prepared(*example_inputs)  # dynamic quant observes nothing, but prepare wants one run
    return torch.export.export(convert_pt2e(prepared), tuple(example_inputs))


def _first_output(out) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def layer_sensitivity(module: nn.Module, example_inputs: tuple, calibration: Sequence[tuple],
                      candidates: Sequence[str], mode: str = "keep_fp32",
                      eval_inputs: Sequence[tuple] | None = None) -> list[tuple[str, float]]:
    """Output SQNR (dB, vs fp32 eager) per candidate module, best first.

    ``mode="keep_fp32"``: everything is int8 except that candidate (high SQNR = the candidate
    hurts when quantized: put it in ``fp32_fallback``). ``mode="quantize_only"``: only that
    candidate is int8 (low SQNR = sensitive). ``calibration`` must be re-iterable (a list);
    SQNR is measured on ``eval_inputs`` (default: the calibration samples), on the first output.
    The result also carries ``("<all int8>", sqnr)`` or ``("<none>", inf)`` as a baseline.
    """
    if mode not in ("keep_fp32", "quantize_only"):
        raise InvalidArgumentError(f"mode must be 'keep_fp32' or 'quantize_only', got {mode!r}")
    calibration = list(calibration)
    eval_inputs = list(eval_inputs) if eval_inputs is not None else calibration
    gm = _graph_module(module, example_inputs)
    _check_names(gm, candidates)
    everything = _all_module_paths(gm) if mode == "quantize_only" else set()
    del gm
    with torch.no_grad():
        refs = [_first_output(module(*x)) for x in eval_inputs]

    def score(fallback: list[str]) -> float:
        # A fresh export of ``module`` per candidate shares its weights (a deep copy would add
        # 2.9 GB per scoring at full size); the quantized program is freed before the next
        # one: graph modules hold reference cycles, which Python frees only when gc runs.
        ep = quantize_pt2e_static(module, example_inputs, calibration, fallback)
        q = ep.module()
        with torch.no_grad():
            outs = [_first_output(q(*x)) for x in eval_inputs]
        del ep, q
        release_freed_memory()
        return sqnr_db(torch.cat([r.flatten() for r in refs]),
                       torch.cat([o.flatten() for o in outs]))

    results = []
    if mode == "keep_fp32":
        results.append(("<all int8>", score([])))
        for name in candidates:
            results.append((name, score([name])))
    else:
        for name in candidates:
            results.append((name, score(_complement(everything, name))))
    results.sort(key=lambda item: item[1], reverse=True)
    return results


def _all_module_paths(gm: torch.fx.GraphModule) -> set[str]:
    return {p for n in gm.graph.nodes for p in _module_paths(n) if p}


def _complement(names: set[str], keep: str) -> list[str]:
    """Leaf-most module names not inside ``keep`` and not an ancestor of it."""
    def related(name: str) -> bool:
        return name == keep or name.startswith(f"{keep}.") or keep.startswith(f"{name}.")
    return sorted(n for n in names if not related(n))
