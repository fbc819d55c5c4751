"""``MilModel``: an ``.mlpackage`` run on the host, with Core ML's ``predict`` shape of API."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from mobile_sd.runtimes.coreml.interpreter import OpInfo, prepare, run_prepared
from mobile_sd.runtimes.coreml.load import load_package


def _recipe_from_manifest(path: Path) -> str | None:
    manifest = path.parent / "manifest.json"
    try:
        recipe = json.loads(manifest.read_text()).get("recipe")
    except (OSError, ValueError, AttributeError):
        return None
    return recipe.get("name") if isinstance(recipe, dict) else recipe if isinstance(recipe, str) else None


class MilModel:
    """A Core ML ML Program executed by the MIL interpreter (torch kernels, CPU).

    ``mode="typed"`` keeps the program's fp16 vars in fp16; ``mode="fp32"`` widens them.
    ``recipe`` (default: read from the export folder's ``manifest.json``) only labels errors.
    """

    def __init__(self, path: str | os.PathLike, mode: str = "typed", recipe: str | None = None):
        self.path = Path(path)
        self.package = load_package(self.path)
        self.recipe = recipe if recipe is not None else _recipe_from_manifest(self.path)
        self.mode = mode
        self._prepared = prepare(self.package.function, mode, self.path, self.recipe)

    @property
    def input_names(self) -> list[str]:
        return list(self.package.input_names)

    @property
    def output_names(self) -> list[str]:
        return list(self.package.output_names)

    @property
    def spec_version(self) -> int:
        return self.package.spec_version

    @property
    def program(self):
        return self.package.program

    def ops(self) -> list[OpInfo]:
        """Executed ops in order (name, type, outputs, weight names, source-module hint)."""
        return list(self._prepared.ops)

    def op_types(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for op in self.package.function.operations:
            counts[op.op_type] = counts.get(op.op_type, 0) + 1
        return counts

    def predict(self, inputs: dict, record: bool = False, as_numpy: bool = True):
        """Run once. Outputs are fp32 (numpy unless ``as_numpy=False``), keyed by name; with
        ``record=True`` returns ``(outputs, recorded)`` (every op output, fp32 torch)."""
        result = run_prepared(self._prepared, inputs, record=record, path=self.path)
        outputs, recorded = result if record else (result, None)
        conv = (lambda t: t.float().numpy() if t.is_floating_point() else t.numpy()) if as_numpy \
            else (lambda t: t.float() if t.is_floating_point() else t)
        outputs = {k: conv(v) for k, v in outputs.items()}
        return (outputs, recorded) if record else outputs

    def __repr__(self) -> str:
        return f"MilModel({str(self.path)!r}, mode={self.mode!r}, ops={len(self._prepared.steps)})"


def first_divergence(recorded: dict, reference: dict, ops: list[OpInfo], min_psnr_db: float = 40.0):
    """The first op (in execution order) whose output's PSNR vs ``reference`` (same var names,
    e.g. an fp32-mode or uncorrupted run) drops below ``min_psnr_db``; ``None`` if none does."""
    for info in ops:
        for name in info.outputs:
            if name in recorded and name in reference:
                a, b = recorded[name], reference[name]
                if not (isinstance(a, torch.Tensor) and a.is_floating_point()):
                    continue
                if psnr(a, b) < min_psnr_db:
                    return info, name
    return None


def psnr(test, ref) -> float:
    """PSNR (dB) of ``test`` against ``ref``, peak = max |ref|; inf/nan in test -> -inf."""
    test = torch.as_tensor(np.asarray(test) if not isinstance(test, torch.Tensor) else test).double()
    ref = torch.as_tensor(np.asarray(ref) if not isinstance(ref, torch.Tensor) else ref).double()
    if not torch.isfinite(test).all():
        return float("-inf")
    mse = torch.mean((test - ref) ** 2).item()
    peak = torch.max(torch.abs(ref)).item()
    if mse == 0:
        return float("inf")
    return 10 * np.log10(max(peak, 1e-12) ** 2 / mse)
