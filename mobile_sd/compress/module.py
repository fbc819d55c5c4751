"""Palettize the conv / linear weights of a torch ``nn.Module`` following a CompressionConfig.

Op types use Core ML's vocabulary (``conv``, ``conv_transpose``, ``linear``) and op names are
module names (``down.0.conv``), so one config reads the same in torch and in Core ML. Tensors
with at most ``config.weight_threshold`` elements are left alone (coremltools' rule), as are
ops whose spec is ``None``; each one is in the report with the reason.

>>> import torch
>>> from mobile_sd.compress.config import PalettizeSpec
>>> net = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3), torch.nn.ReLU(), torch.nn.Linear(8, 4))
>>> res = palettize_module(net, PalettizeSpec(4))
>>> [(r.name, r.nbits, r.skipped) for r in res.report]
[('0.weight', 4, None), ('2.weight', None, 'has 32 <= 2048 elements (weight_threshold)')]
>>> sorted(res.weights), res.report[0].snr_db > 15
(['0.weight'], True)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch
from torch import nn

from mobile_sd.compress.config import CompressionConfig, PalettizeSpec, Spec
from mobile_sd.compress.palettize import palettize_tensor

# (module class, Core ML op type, output-channel axis of the weight)
_OPS = ((nn.ConvTranspose1d, "conv_transpose", 1), (nn.ConvTranspose2d, "conv_transpose", 1),
        (nn.ConvTranspose3d, "conv_transpose", 1), (nn.Conv1d, "conv", 0), (nn.Conv2d, "conv", 0),
        (nn.Conv3d, "conv", 0), (nn.Linear, "linear", 0))


@dataclass(frozen=True)
class TensorReport:
    """One weight: what was done to it, its SNR and its compressed size (fp16 if skipped)."""

    name: str
    op_type: str
    shape: tuple
    spec: Optional[str]
    nbits: Optional[int]
    snr_db: Optional[float]
    size_bytes: int
    skipped: Optional[str] = None


@dataclass
class ModulePalettization:
    """The report per weight and the snapped (dequantized) weights by parameter name."""

    report: list[TensorReport]
    weights: dict[str, torch.Tensor] = field(default_factory=dict)

    def apply_to(self, module: nn.Module) -> None:
        """Copy the snapped weights into ``module`` (same structure) in place."""
        params = dict(module.named_parameters())
        with torch.no_grad():
            for name, value in self.weights.items():
                params[name].copy_(value)

    def to_json(self) -> list[dict]:
        return [{**asdict(r), "shape": list(r.shape)} for r in self.report]


@dataclass(frozen=True)
class WeightOp:
    """A compressible weight: module name, parameter name, op type, channel axis, tensor."""

    module: str
    name: str
    op_type: str
    channel_axis: int
    weight: torch.Tensor


def weight_ops(module: nn.Module) -> Iterator[WeightOp]:
    """The conv / conv_transpose / linear weights of ``module``, in module order."""
    for mod_name, mod in module.named_modules():
        for cls, op_type, axis in _OPS:
            if isinstance(mod, cls) and isinstance(getattr(mod, "weight", None), torch.Tensor):
                name = f"{mod_name}.weight" if mod_name else "weight"
                yield WeightOp(mod_name, name, op_type, axis, mod.weight)
                break


def palettize_module(module: nn.Module, config: CompressionConfig | Spec, *,
                     inplace: bool = False) -> ModulePalettization:
    """Palettize every selected weight; ``inplace`` writes the snapped weights into ``module``
    (then ``weights`` stays empty, saving a copy of the model).

    Raises RecipeError when ``config.op_name`` names a module without a conv/linear weight.
    """
    config = CompressionConfig.of(config)
    ops = list(weight_ops(module))
    config.check_names([op.module for op in ops], what="conv/linear module")
    result = ModulePalettization([])
    for op in ops:
        spec = config.resolve(op.module, op.op_type)
        reason = skip_reason(op, spec, config.weight_threshold)
        if reason:
            result.report.append(_skipped(op, spec, reason))
            continue
        pal = palettize_tensor(op.weight, spec.nbits, spec.granularity, spec.group_size,
                               spec.mode, channel_axis=op.channel_axis)
        snapped = torch.from_numpy(pal.dequantized()).to(op.weight.dtype)
        if inplace:
            with torch.no_grad():
                op.weight.copy_(snapped)
        else:
            result.weights[op.name] = snapped
        result.report.append(TensorReport(op.name, op.op_type, tuple(op.weight.shape),
                                          spec.describe(), spec.nbits, pal.snr_db,
                                          pal.size_bytes()))
    return result


def skip_reason(op: WeightOp, spec: Optional[Spec], threshold: int) -> Optional[str]:
    """Why ``op`` stays uncompressed under ``spec``, or None (mirrors coremltools' rules)."""
    if spec is None:
        return "config is None for this op"
    if not isinstance(spec, PalettizeSpec):
        return f"{spec.describe()} is applied in Core ML only (coreml_apply)"
    if op.weight.numel() <= threshold:
        return f"has {op.weight.numel()} <= {threshold} elements (weight_threshold)"
    channels = op.weight.shape[op.channel_axis]
    if spec.granularity == "per_grouped_channel" and channels % spec.group_size:
        return (f"{channels} output channels are not divisible by group_size "
                f"{spec.group_size} (coremltools skips such weights too)")
    return None


def _skipped(op: WeightOp, spec: Optional[Spec], reason: str) -> TensorReport:
    fp16 = op.weight.numel() * 2
    return TensorReport(op.name, op.op_type, tuple(op.weight.shape),
                        spec.describe() if spec else None, None, None, fp16, reason)


def total_size_bytes(report: list[TensorReport]) -> int:
    """Sum of compressed sizes (fp16 for the uncompressed weights)."""
    return int(np.sum([r.size_bytes for r in report]))
