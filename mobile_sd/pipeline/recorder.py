"""Record every component's inputs and outputs at every step of a pipeline run.

The recording is the calibration data for int8 export and the "real inputs" of parity checks:
for each prompt, the text encoder calls (cond and uncond), every denoising step's UNet call
(both CFG branches in one batch-2 call) and the decoder call. Saved as one safetensors file
(tensors) with a JSON index in its metadata, so it loads without pickles.

>>> rec = Recorder()
>>> rec.record("decoder", {"z": torch.zeros(1, 4, 8, 8)}, {"image": torch.zeros(1, 3, 64, 64)})
>>> rec.calls("decoder")[0].inputs["z"].shape
torch.Size([1, 4, 8, 8])
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mobile_sd.errors import CalibrationError


@dataclass
class Call:
    """One component call: named input and output tensors plus context (prompt, step...)."""
    component: str
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)


class Recorder:
    """Collects :class:`Call` records; ``save``/``load`` round-trip through safetensors."""

    def __init__(self) -> None:
        self._calls: list[Call] = []
        self.context: dict = {}

    def record(self, component: str, inputs: dict[str, torch.Tensor],
               outputs: dict[str, torch.Tensor], **info) -> None:
        detach = lambda d: {k: v.detach().clone().contiguous() for k, v in d.items()}  # noqa: E731
        self._calls.append(Call(component, detach(inputs), detach(outputs),
                                {**self.context, **info}))

    def calls(self, component: str | None = None) -> list[Call]:
        return [c for c in self._calls if component is None or c.component == component]

    def input_tuples(self, component: str, names: list[str]) -> list[tuple[torch.Tensor, ...]]:
        """Inputs of every call of ``component`` as tuples in ``names`` order (calibration)."""
        calls = self.calls(component)
        if not calls:
            raise CalibrationError(f"the recording has no {component} calls; record a pipeline "
                                   "run first (`mobile-sd generate --record FILE`)")
        missing = [n for n in names if n not in calls[0].inputs]
        if missing:
            raise CalibrationError(f"recorded {component} calls lack input(s) {missing}; "
                                   f"they have {sorted(calls[0].inputs)}")
        return [tuple(c.inputs[n] for n in names) for c in calls]

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        from mobile_sd.utils.files import default_file_mode

        tensors, index = {}, []
        for i, call in enumerate(self._calls):
            for kind, group in (("in", call.inputs), ("out", call.outputs)):
                for name, tensor in group.items():
                    tensors[f"{i:05d}/{kind}/{name}"] = tensor
            index.append({"component": call.component, "inputs": list(call.inputs),
                          "outputs": list(call.outputs), "info": call.info})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"mobile_sd_calls": json.dumps(index)})
        tmp.chmod(default_file_mode())  # safetensors writes via a 0600 temp file
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Recorder":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise CalibrationError(f"{path}: no such recording; make one with "
                                   "`mobile-sd generate --record FILE`")
        rec = cls()
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if "mobile_sd_calls" not in meta:
                raise CalibrationError(f"{path}: not a mobile-sd recording (no call index)")
            for i, entry in enumerate(json.loads(meta["mobile_sd_calls"])):
                get = lambda kind, n: handle.get_tensor(f"{i:05d}/{kind}/{n}")  # noqa: E731
                rec._calls.append(Call(entry["component"],
                                       {n: get("in", n) for n in entry["inputs"]},
                                       {n: get("out", n) for n in entry["outputs"]},
                                       entry.get("info", {})))
        return rec
