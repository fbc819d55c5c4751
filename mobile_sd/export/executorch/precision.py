"""Make the ExportedProgram a backend lowers, for each precision (and tag weights for a .ptd).

- fp32: ``torch.export`` as is.
- fp16 (XNNPACK): weights and compute in fp16 with fp32 I/O: a wrapper casts floating inputs to
  half and outputs back, so every precision of a component has the same interface. The two
  casts stay on portable kernels (XNNPACK does not delegate dtype conversions). Core ML takes
  fp16 from its compile spec instead, on the fp32 graph.
- int8 / int8_dynamic: PT2E (:mod:`mobile_sd.compress.pt2e`).
- int4_weight (XNNPACK): torchao ``Int8DynamicActivationIntxWeightConfig`` (int4 weights in
  groups of 32, int8 dynamic activations) on Linear layers whose width divides by 32; convs
  stay fp32. XNNPACK runs these as ``qd8-f32-qb4w`` GEMMs.
"""
from __future__ import annotations

import copy
from typing import Iterable, Sequence

import torch
from torch import nn

INT4_GROUP = 32


class HalfIO(nn.Module):
    """Runs ``module`` in fp16 behind an fp32 interface (integer inputs pass through)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(module).half()

    def forward(self, *inputs: torch.Tensor):
        cast = [x.half() if x.is_floating_point() else x for x in inputs]
        out = self.module(*cast)
        if isinstance(out, (tuple, list)):
            return type(out)(o.float() for o in out)
        return out.float()


def _int4_linears(module: nn.Module) -> nn.Module:
    from torchao.quantization import quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig

    quantized = copy.deepcopy(module)
    config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                   weight_granularity=PerGroup(INT4_GROUP))
    quantize_(quantized, config, filter_fn=lambda m, _: (
        isinstance(m, nn.Linear) and m.in_features % INT4_GROUP == 0))
    return quantized


def exported_for(module: nn.Module, example_inputs: tuple, backend: str, precision: str,
                 calibration: Iterable | None, fp32_fallback: Sequence[str],
                 input_names: Sequence[str] | None,
                 ) -> tuple[torch.export.ExportedProgram, list[str]]:
    """(program to lower, notes on what was ignored or approximated)."""
    from mobile_sd.compress import pt2e

    notes: list[str] = []
    if backend == "coreml":
        if precision in ("int8", "int4_weight"):
            notes.append(f"Core ML {precision} is weight-only linear quantization by coremltools "
                         "(conv + linear); activations stay fp16")
            if calibration is not None or fp32_fallback:
                notes.append("calibration / fp32_fallback are not used by Core ML weight-only "
                             "quantization")
        return torch.export.export(module, example_inputs), notes
    if precision == "fp16":
        return torch.export.export(HalfIO(module).eval(), example_inputs), notes
    if precision == "int8":
        return pt2e.quantize_pt2e_static(module, example_inputs, calibration, fp32_fallback,
                                         input_names=input_names), notes
    if precision == "int8_dynamic":
        return pt2e.quantize_pt2e_dynamic_linear(module, example_inputs), notes
    if precision == "int4_weight":
        notes.append(f"int4 weights on Linear layers with in_features % {INT4_GROUP} == 0; "
                     "convs and other linears stay fp32")
        return torch.export.export(_int4_linears(module), example_inputs), notes
    return torch.export.export(module, example_inputs), notes


def tag_weights_external(ep: torch.export.ExportedProgram, example_inputs: tuple,
                         tag: str) -> torch.export.ExportedProgram:
    """Re-export ``ep`` with every constant tagged to go to ``<tag>.ptd`` (delegate weights too)."""
    from executorch.exir.passes.external_constants_pass import (
        delegate_external_constants_pass_unlifted)

    unlifted = ep.module()
    delegate_external_constants_pass_unlifted(module=unlifted, gen_tag_fn=lambda _node: tag)
    return torch.export.export(unlifted, example_inputs)


def drop_unused_constants(ep: torch.export.ExportedProgram) -> list[str]:
    """Remove weights, buffers and constants that no op reads from ``ep``, in place; returns
    the names of the buffers and constants among them (unused parameters are not news:
    ExecuTorch drops those itself, e.g. every fp32 weight PT2E replaced by an int8 copy).

    ExecuTorch's own pass drops unused *parameters* only. A buffer left behind by a rewrite
    (PT2E int8 replaces ``xnnpack_upsample``'s phase kernel by an int8 copy and leaves the fp32
    buffer unread) would otherwise be serialized into the ``.pte`` / ``.ptd``: 231 MB of dead
    fp32 (225 MiB) in the full-size int8 UNet before this pass.
    """
    from torch.export.graph_signature import InputKind, OutputKind

    kinds = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
    mutated = {s.target for s in ep.graph_signature.output_specs
               if s.kind == OutputKind.BUFFER_MUTATION}
    placeholders = {n.name: n for n in ep.graph_module.graph.nodes if n.op == "placeholder"}
    unused = [s for s in ep.graph_signature.input_specs
              if s.kind in kinds and s.target not in mutated
              and not placeholders[s.arg.name].users]
    for spec in unused:
        ep.graph_signature.input_specs.remove(spec)
        table = ep._state_dict if spec.target in ep._state_dict else ep._constants
        table.pop(spec.target, None)
        ep.graph_module.graph.erase_node(placeholders[spec.arg.name])
    if unused:
        ep.graph_module.recompile()
    return [s.target for s in unused if s.kind != InputKind.PARAMETER]
