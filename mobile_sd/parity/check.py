"""Per-component parity: the artifact on its runtime against eager PyTorch, in two tiers.

1. **lowering** (tight, ``lowering_min_psnr_db``, default 60 dB): against the eager module with
   the export's surgery and the same compression (fp32, or fp16 via ``.half()``). A failure
   here is a lowering/runtime bug, not a precision choice. Skipped with the reason when no
   eager model carries the export's compression (int8, Core ML).
2. **fp32** (the recipe's budget, ``component_min_psnr_db``, default 40 dB): against the fp32
   original, i.e. what the user trained.

Inputs: ``random`` (each input's :meth:`TensorSpec.random`) and ``pipeline``: the real inputs
the component sees in the fp32 reference pipeline (every prompt, every denoising step, both CFG
branches), recorded with :class:`~mobile_sd.pipeline.recorder.Recorder` and mapped onto the
artifact's inputs with ``from_call``; their fp32 outputs are the recorded ones.

Gates use the worst sample (lowest PSNR over every output of every input); the report keeps the
per-sample numbers so drift over the denoising steps is visible.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from mobile_sd.metrics import tensor_stats, worst


@dataclass
class Sample:
    """One set of component inputs, and the fp32 original's outputs when recorded."""
    label: str
    kind: str                        # "random" | "pipeline"
    inputs: tuple[torch.Tensor, ...]
    expected: tuple[torch.Tensor, ...] | None = None


@dataclass
class Budget:
    """Gates of one component, read from the manifest (recipe ``parity`` + per component)."""
    fp32_min_psnr_db: float = 40.0
    lowering_min_psnr_db: float = 60.0
    e2e_min_psnr_db: float = 30.0

    @classmethod
    def from_manifest(cls, manifest, name: str | None = None) -> "Budget":
        parity = manifest.recipe.get("parity") or {}
        budget = cls(fp32_min_psnr_db=parity.get("component_min_psnr_db", cls.fp32_min_psnr_db),
                     lowering_min_psnr_db=parity.get("lowering_min_psnr_db", cls.lowering_min_psnr_db),
                     e2e_min_psnr_db=parity.get("e2e_min_psnr_db", cls.e2e_min_psnr_db))
        own = manifest.components.get(name) if name else None
        if own is not None and own.min_psnr_db is not None:
            budget.fp32_min_psnr_db = float(own.min_psnr_db)
        return budget


def _label(call, name: str) -> str:
    info = call.info
    where = f"prompt {info.get('prompt', 0)}"
    if name == "unet":
        return f"{where} step {info.get('step')} (t={info.get('timestep')})"
    if name == "text_encoder":
        return f"{where} {info.get('branch', '')}".strip()
    return where


def make_samples(comp, recorder, n_random: int = 2, seed: int = 0) -> list[Sample]:
    """``n_random`` random input sets, then every recorded pipeline call of the component."""
    samples = [Sample(f"random {i}", "random", comp.example_inputs(seed + i)) for i in range(n_random)]
    seen: list[tuple] = []
    for call in (recorder.calls(comp.name) if recorder is not None else []):
        inputs, expected = comp.from_call(call)
        # The unconditional prompt is encoded once per prompt: keep one copy.
        if any(len(s) == len(inputs) and all(torch.equal(a, b) for a, b in zip(s, inputs))
               for s in seen):
            continue
        seen.append(inputs)
        samples.append(Sample(_label(call, comp.name), "pipeline", tuple(inputs), tuple(expected)))
    return samples


@dataclass
class Tier:
    """One comparison tier being accumulated over samples."""
    name: str
    gate: float
    reference: Callable | None
    reason: str | None = None
    rows: list[dict] = field(default_factory=list)

    def add(self, sample: Sample, outputs: Sequence[torch.Tensor], names: Sequence[str],
            expected: Sequence[torch.Tensor]) -> None:
        per_output = {n: tensor_stats(e.float(), o) for n, e, o in zip(names, expected, outputs)}
        self.rows.append({"label": sample.label, "kind": sample.kind, **worst(per_output.values()),
                          "by_output": per_output})

    def result(self) -> dict:
        if self.reference is None:
            return {"status": "skip", "reason": self.reason, "gate_min_psnr_db": self.gate}
        overall = worst(self.rows)
        kinds = sorted({r["kind"] for r in self.rows})
        failed = overall["psnr_db"] < self.gate or overall["nonfinite"] > 0
        worst_row = min(self.rows, key=lambda r: r["psnr_db"])
        return {"status": "fail" if failed else "pass", "gate_min_psnr_db": self.gate,
                "worst": overall, "worst_sample": worst_row["label"],
                "by_input": {k: worst(r for r in self.rows if r["kind"] == k) for k in kinds},
                "samples": [{k: r[k] for k in ("label", "kind", "psnr_db", "sqnr_db", "cosine",
                                               "max_abs", "mean_abs")} for r in self.rows]}


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    if isinstance(out, torch.Tensor):
        return (out,)
    if hasattr(out, "sample"):
        return (out.sample,)
    return tuple(out)


@torch.no_grad()
def compare(runner: Callable, samples: Sequence[Sample], output_names: Sequence[str],
            original: Callable, lowering: Callable | None, lowering_reason: str | None,
            budget: Budget) -> tuple[dict, Sample | None]:
    """Run every sample on ``runner`` and compare with both tiers.

    Returns ``({"lowering": ..., "fp32": ...}, worst sample)`` where the worst sample is the
    one with the lowest PSNR in the first failing tier (None when both pass).
    """
    tiers = [Tier("lowering", budget.lowering_min_psnr_db, lowering, lowering_reason),
             Tier("fp32", budget.fp32_min_psnr_db, original)]
    for sample in samples:
        outputs = runner(*sample.inputs)
        for tier in tiers:
            if tier.reference is None:
                continue
            if tier.name == "fp32" and sample.expected is not None:
                expected = sample.expected
            else:
                expected = _as_tuple(tier.reference(*sample.inputs))
            tier.add(sample, outputs, output_names, expected)
    results = {t.name: t.result() for t in tiers}
    failing = next((r for r in results.values() if r["status"] == "fail"), None)
    worst_sample = None
    if failing is not None:
        worst_sample = next(s for s in samples if s.label == failing["worst_sample"])
    return results, worst_sample


def component_status(tiers: dict) -> str:
    """fail if any tier fails; pass if at least one tier ran and none failed."""
    statuses = [t["status"] for t in tiers.values()]
    if "fail" in statuses:
        return "fail"
    return "pass" if "pass" in statuses else "skip"


def check_component(runner, original, lowering, lowering_reason, samples, budget,
                    locate: Callable | None = None) -> dict:
    """Both tiers for one opened component; on a failure, ``locate(sample, gate)`` names where
    the export departs. Returns the component's report entry (without file/runtime keys)."""
    start = time.perf_counter()
    tiers, worst_sample = compare(runner, samples, original.output_names, original.module,
                                  lowering, lowering_reason, budget)
    entry = {"status": component_status(tiers), "tiers": tiers,
             "inputs": {k: sum(s.kind == k for s in samples) for k in ("random", "pipeline")}}
    if worst_sample is not None and locate is not None:
        failed = next(t for t in tiers.values() if t["status"] == "fail")
        entry["locator"] = locate(worst_sample, failed["gate_min_psnr_db"])
    entry["seconds"] = round(time.perf_counter() - start, 2)
    return entry
