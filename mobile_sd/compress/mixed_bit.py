"""Mixed-bit palettization: bits per weight from measured sensitivity, to a size or PSNR target.

1. :func:`measure_sensitivity`: for each weight and candidate nbits, palettize *only* that
   weight and measure the module's output PSNR on recorded example inputs (fp32, in torch).
2. :func:`choose_bits`: start every weight at the highest candidate and repeatedly lower the
   weight whose next step down costs the least predicted output error per byte saved
   (errors from step 1, assumed additive), until the size target is met;
   :func:`choose_bits_for_psnr` walks the same path to a PSNR target, confirmed by measuring.
3. :func:`pareto_curve`: a sweep of size targets; every chosen assignment is *measured* (all
   weights palettized together), never predicted, plus the uniform-bits baselines.

Cost: ``T x C`` palettizations and ``T x C x len(inputs)`` forwards for T weights and C
candidates (limit T with ``max_tensors``: the largest weights are optimised, the others stay
at ``others_nbits``), then ``points + C`` measured assignments for the curve. Peak memory:
one fp32 copy of the optimised weights.

PSNR is ml-stable-diffusion's: 20*log10(max|ref|) - 10*log10(mse), over all outputs of all
example inputs. Results are plain data (``to_json``); :mod:`mixed_bit_plot` draws them.

>>> import torch
>>> torch.manual_seed(0) and None
>>> net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
>>> inputs = [(torch.randn(8, 64),)]
>>> sens = measure_sensitivity(net, inputs, candidates=(2, 4, 8))
>>> [s.name for s in sens], sens[0].psnr_db[8] > sens[0].psnr_db[2]
(['0', '2'], True)
>>> bits = choose_bits(sens, target_bytes=sum(s.size_bytes[4] for s in sens))
>>> total_bytes(sens, bits) <= sum(s.size_bytes[4] for s in sens)
True
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from mobile_sd.compress.config import CompressionConfig, PalettizeSpec
from mobile_sd.compress.module import skip_reason, weight_ops
from mobile_sd.compress.palettize import palettize_tensor
from mobile_sd.errors import InvalidArgumentError

Inputs = Sequence[tuple]


@dataclass(frozen=True)
class Sensitivity:
    """One weight (by module name): output PSNR, weight SNR and size for each candidate."""

    name: str
    op_type: str
    numel: int
    psnr_db: dict[int, float]
    snr_db: dict[int, float]
    size_bytes: dict[int, int]


@dataclass(frozen=True)
class CurvePoint:
    """A measured assignment: total weight bytes (compressed + untouched fp16) and PSNR."""

    label: str
    size_bytes: int
    psnr_db: float
    predicted_psnr_db: Optional[float]
    bits: dict[str, int]


@dataclass
class MixedBitResult:
    """Sensitivities, the mixed-bit curve and the uniform baselines (JSON via ``to_json``)."""

    sensitivities: list[Sensitivity]
    curve: list[CurvePoint]
    uniform: list[CurvePoint]
    fixed_bytes: int
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"meta": self.meta, "fixed_bytes": self.fixed_bytes,
                "sensitivities": [asdict(s) for s in self.sensitivities],
                "curve": [asdict(p) for p in self.curve],
                "uniform": [asdict(p) for p in self.uniform]}


class _Measurer:
    """Runs the module on the example inputs and scores outputs against the fp32 reference.

    ``threads``: torch intra-op threads for the forwards (restored after each). On a busy
    2-core machine a tiny UNet's eager forward took 2.9 s with 2 threads and 36 ms with 1.
    """

    def __init__(self, module: nn.Module, inputs: Inputs, threads: Optional[int] = None):
        if not inputs:
            raise InvalidArgumentError("mixed-bit needs at least one example input tuple")
        self.module, self.inputs = module, [tuple(i) for i in inputs]
        self.threads = threads
        self.reference = self._outputs()
        self.peak = float(self.reference.abs().max())

    def _outputs(self) -> torch.Tensor:
        with torch.no_grad(), _torch_threads(self.threads):
            outs = [_flatten(self.module(*args)) for args in self.inputs]
        return torch.cat(outs).double()

    def psnr_db(self) -> float:
        from mobile_sd.metrics import psnr_from_mse

        mse = float(((self._outputs() - self.reference) ** 2).mean())
        return psnr_from_mse(mse, max(self.peak, 1e-30), cap=math.inf)


@contextlib.contextmanager
def _torch_threads(threads: Optional[int]):
    """Scoped ``torch.set_num_threads`` (None: leave it alone)."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _flatten(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.detach().reshape(-1).float()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        parts = [_flatten(o) for o in out if o is not None]
        return torch.cat(parts) if parts else torch.zeros(0)
    if hasattr(out, "to_tuple"):  # diffusers / transformers ModelOutput
        return _flatten(out.to_tuple())
    raise InvalidArgumentError(f"cannot score a module output of type {type(out).__name__}")


def measure_sensitivity(module: nn.Module, inputs: Inputs, candidates=(2, 4, 6, 8), *,
                        granularity: str = "per_tensor", group_size: int = 16,
                        max_tensors: Optional[int] = None, weight_threshold: int = 2048,
                        threads: Optional[int] = None,
                        progress: Optional[Callable[[str], None]] = None) -> list[Sensitivity]:
    """Output PSNR of ``module`` with only one weight palettized, per weight and candidate.

    ``threads``: torch threads for the forwards (1 is much faster for small models on a busy
    machine); None leaves torch's setting alone.
    """
    candidates = sorted(set(candidates))
    ops = selected_ops(module, candidates[-1], granularity, group_size, weight_threshold,
                       max_tensors)
    measurer = _Measurer(module, inputs, threads)
    result = []
    for op in ops:
        original = op.weight.detach().clone()
        psnr, snr, size = {}, {}, {}
        for nbits in candidates:
            pal = palettize_tensor(original, nbits, granularity, group_size,
                                   channel_axis=op.channel_axis)
            with torch.no_grad():
                op.weight.copy_(torch.from_numpy(pal.dequantized()))
            psnr[nbits], snr[nbits], size[nbits] = measurer.psnr_db(), pal.snr_db, pal.size_bytes()
        with torch.no_grad():
            op.weight.copy_(original)
        result.append(Sensitivity(op.module, op.op_type, op.weight.numel(), psnr, snr, size))
        if progress:
            progress(f"{op.module}: " + ", ".join(f"{b}b {p:.1f} dB" for b, p in psnr.items()))
    return result


def selected_ops(module, nbits, granularity, group_size, weight_threshold, max_tensors):
    """The weights mixed-bit optimises: compressible ones, the largest ``max_tensors``."""
    spec = PalettizeSpec(nbits, granularity, group_size)
    ops = [op for op in weight_ops(module) if skip_reason(op, spec, weight_threshold) is None]
    if max_tensors is not None:
        keep = {id(op) for op in sorted(ops, key=lambda o: -o.weight.numel())[:max_tensors]}
        ops = [op for op in ops if id(op) in keep]
    return ops


def choose_bits(sens: list[Sensitivity], target_bytes: float) -> dict[str, int]:
    """Bits per weight meeting ``target_bytes`` (sizes of these weights only), greedily.

    Raises InvalidArgumentError if even the lowest candidate for every weight is too big.
    """
    path = descent_path(sens)
    for bits in path:
        if total_bytes(sens, bits) <= target_bytes:
            return bits
    smallest = total_bytes(sens, path[-1])
    raise InvalidArgumentError(f"target {target_bytes:.0f} bytes is below the smallest "
                               f"reachable size {smallest} bytes; lower the candidates")


def descent_path(sens: list[Sensitivity]) -> list[dict[str, int]]:
    """Assignments from all-highest to all-lowest bits, one weight one step down at a time,
    each step the least predicted output error per byte saved."""
    bits = {s.name: max(s.psnr_db) for s in sens}
    path = [dict(bits)]
    by_name = {s.name: s for s in sens}
    while True:
        best, best_cost = None, math.inf
        for name, b in bits.items():
            lower = [c for c in by_name[name].psnr_db if c < b]
            if not lower:
                continue
            c = max(lower)
            s = by_name[name]
            saved = s.size_bytes[b] - s.size_bytes[c]
            cost = (_mse(s.psnr_db[c]) - _mse(s.psnr_db[b])) / max(saved, 1)
            if cost < best_cost:
                best, best_cost = (name, c), cost
        if best is None:
            return path
        bits[best[0]] = best[1]
        path.append(dict(bits))


def predicted_psnr_db(sens: list[Sensitivity], bits: dict[str, int]) -> float:
    """PSNR if per-weight output errors added up (peak normalised to 1)."""
    from mobile_sd.metrics import ratio_db

    return ratio_db(1.0, sum(_mse(s.psnr_db[bits[s.name]]) for s in sens), cap=math.inf)


def total_bytes(sens: list[Sensitivity], bits: dict[str, int]) -> int:
    return int(sum(s.size_bytes[bits[s.name]] for s in sens))


def _mse(psnr_db: float) -> float:
    return 0.0 if math.isinf(psnr_db) else 10 ** (-psnr_db / 10)


def measure_assignment(module: nn.Module, inputs: Inputs, bits: dict[str, int], *,
                       granularity: str = "per_tensor", group_size: int = 16,
                       threads: Optional[int] = None,
                       measurer: Optional[_Measurer] = None) -> float:
    """Output PSNR with every weight in ``bits`` palettized at once (weights restored after)."""
    measurer = measurer or _Measurer(module, inputs, threads)
    ops = {op.module: op for op in weight_ops(module)}
    originals = {name: ops[name].weight.detach().clone() for name in bits}
    try:
        with torch.no_grad():
            for name, nbits in bits.items():
                pal = palettize_tensor(originals[name], nbits, granularity, group_size,
                                       channel_axis=ops[name].channel_axis)
                ops[name].weight.copy_(torch.from_numpy(pal.dequantized()))
        return measurer.psnr_db()
    finally:
        with torch.no_grad():
            for name, value in originals.items():
                ops[name].weight.copy_(value)


def pareto_curve(module: nn.Module, inputs: Inputs, sens: list[Sensitivity], *,
                 points: int = 8, granularity: str = "per_tensor", group_size: int = 16,
                 others_nbits: Optional[int] = None, weight_threshold: int = 2048,
                 threads: Optional[int] = None) -> MixedBitResult:
    """Measured (size, PSNR) of mixed-bit assignments at ``points`` evenly spaced size targets,
    and of every uniform assignment. Weights not in ``sens`` count at their fp16 size, or are
    palettized at ``others_nbits`` (when given) in every point."""
    measurer = _Measurer(module, inputs, threads)
    fixed, other_bits = _fixed_part(module, sens, others_nbits, granularity, group_size,
                                    weight_threshold)
    path = descent_path(sens)
    hi, lo = total_bytes(sens, path[0]), total_bytes(sens, path[-1])

    def point(label: str, bits: dict[str, int]) -> CurvePoint:
        psnr = measure_assignment(module, inputs, {**other_bits, **bits},
                                  granularity=granularity, group_size=group_size,
                                  measurer=measurer)
        return CurvePoint(label, fixed + total_bytes(sens, bits), psnr,
                          predicted_psnr_db(sens, bits), bits)

    chosen: list[tuple[float, dict[str, int]]] = []
    for target in np.linspace(lo, hi, points):
        bits = choose_bits(sens, target)
        if all(bits != b for _, b in chosen):
            chosen.append((target, bits))
    curve = [point(f"mixed <= {_human(t + fixed)}", b) for t, b in chosen]
    uniform = [point(f"uniform {b}-bit", {s.name: b for s in sens})
               for b in sorted(sens[0].psnr_db)] if sens else []
    meta = {"points": points, "granularity": granularity, "group_size": group_size,
            "others_nbits": others_nbits, "inputs": len(inputs),
            "psnr": "20*log10(max|ref|) - 10*log10(mse) over all outputs"}
    return MixedBitResult(sens, curve, uniform, fixed, meta)


def _human(size: float) -> str:
    return f"{size / 2**20:.2f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


def choose_bits_for_psnr(module: nn.Module, inputs: Inputs, sens: list[Sensitivity],
                         target_psnr_db: float, *, granularity: str = "per_tensor",
                         group_size: int = 16,
                         threads: Optional[int] = None) -> tuple[dict[str, int], float]:
    """The smallest assignment on the descent path whose *measured* PSNR reaches the target:
    start from the smallest one predicted to reach it, then step up until a measurement
    confirms. Returns (bits, measured PSNR). Raises InvalidArgumentError if even the highest
    candidates miss the target."""
    measurer = _Measurer(module, inputs, threads)
    path = descent_path(sens)[::-1]  # smallest first
    start = next((i for i, b in enumerate(path) if predicted_psnr_db(sens, b) >= target_psnr_db),
                 len(path) - 1)
    for bits in path[start:]:
        psnr = measure_assignment(module, inputs, bits, granularity=granularity,
                                  group_size=group_size, measurer=measurer)
        if psnr >= target_psnr_db:
            return bits, psnr
    raise InvalidArgumentError(f"target PSNR {target_psnr_db} dB is above what the highest "
                               f"candidate bits reach ({psnr:.2f} dB); add higher candidates")


def _fixed_part(module, sens, others_nbits, granularity, group_size, weight_threshold):
    """Bytes of the weights mixed-bit does not optimise, and bits for the optimisable rest."""
    chosen = {s.name for s in sens}
    other_bits, fixed = {}, 0
    spec = PalettizeSpec(others_nbits or 8, granularity, group_size)
    for op in weight_ops(module):
        if op.module in chosen:
            continue
        if others_nbits and skip_reason(op, spec, weight_threshold) is None:
            other_bits[op.module] = others_nbits
            fixed += palettize_size(op.weight, others_nbits, granularity, group_size,
                                    op.channel_axis)
        else:
            fixed += op.weight.numel() * 2
    weight_params = {id(op.weight) for op in weight_ops(module)}
    fixed += sum(p.numel() * 2 for p in module.parameters() if id(p) not in weight_params)
    return fixed, other_bits


def palettize_size(weight: torch.Tensor, nbits: int, granularity: str, group_size: int,
                   channel_axis: int) -> int:
    """Packed bytes of a palettized weight (indices + fp16 LUTs), without clustering it."""
    groups = weight.shape[channel_axis] // group_size if granularity != "per_tensor" else 1
    return -(-weight.numel() * nbits // 8) + groups * (1 << nbits) * 2


def to_config(bits: dict[str, int], *, granularity: str = "per_tensor", group_size: int = 16,
              coreml_names: bool = False) -> CompressionConfig:
    """A CompressionConfig applying ``bits`` (by module name) and leaving the rest alone.

    ``coreml_names``: key by the Core ML const name of each weight (torch.export path) for
    :func:`coreml_apply.compress_mlmodel`; otherwise by module name for ``palettize_module``.
    """
    from mobile_sd.compress.coreml_apply import coreml_const_name

    def key(name: str) -> str:
        return coreml_const_name(f"{name}.weight") if coreml_names else name

    return CompressionConfig(op_name={key(n): PalettizeSpec(b, granularity, group_size)
                                      for n, b in bits.items()})
