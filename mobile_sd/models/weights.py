"""Reading and writing component weights: safetensors only, validated tensor by tensor.

Nothing is ever unpickled: a folder that holds only ``.bin`` / ``.ckpt`` / ``.pt`` weights is
refused with the command that converts it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mobile_sd.errors import TensorMismatchError, WeightsError

SAFETENSORS_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
CONVERT_HINT = ("convert it once, on a machine where you trust the file, with: python -c "
                "\"import torch, safetensors.torch as s; s.save_file(torch.load('IN', "
                "weights_only=True), 'OUT.safetensors')\" (for diffusers folders, "
                "`pipe.save_pretrained(dir, safe_serialization=True)` does the same)")


def find_weights(folder: Path) -> list[Path]:
    """The safetensors file(s) of a component folder (several when sharded via an index)."""
    for name in SAFETENSORS_NAMES:
        if (folder / name).is_file():
            return [folder / name]
        index = folder / f"{name}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as exc:
                raise WeightsError(f"{index}: not a valid safetensors index ({exc})") from exc
            return [folder / s for s in shards]
    singles = sorted(folder.glob("*.safetensors"))
    if len(singles) == 1:
        return singles
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise WeightsError(f"{folder}: only pickle weights ({', '.join(pickles)}); mobile-sd "
                           f"reads safetensors only and never unpickles. To use them, "
                           f"{CONVERT_HINT}")
    raise WeightsError(f"{folder}: no weights file; expected one of "
                       f"{', '.join(SAFETENSORS_NAMES)}")


def read_safetensors(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Load tensors from safetensors files; a missing or truncated file names itself."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in paths:
        if not path.is_file():
            raise WeightsError(f"{path}: weights file is missing")
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"{path}: cannot read safetensors file ({exc}); it is probably "
                               "truncated or corrupt: copy or write it again") from exc
    return tensors


def check_state_dict(module: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Raise :class:`TensorMismatchError` naming the first differing tensor(s) and shapes."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    for name, tensor in tensors.items():
        if name in expected and tuple(tensor.shape) != expected[name]:
            raise TensorMismatchError(
                f"{where}: tensor {name!r} has shape {tuple(tensor.shape)} in the file but the "
                f"config builds {expected[name]}; the weights do not belong to this config.json")
    unexpected = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unexpected or missing:
        parts = []
        if unexpected:
            parts.append(f"unexpected tensor(s) {_few(unexpected)}")
        if missing:
            parts.append(f"missing tensor(s) {_few(missing)} (shape {expected[missing[0]]})")
        raise TensorMismatchError(f"{where}: {'; '.join(parts)}; the weights do not match "
                                  "the config.json in that folder")


def _few(names: list[str], n: int = 3) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(repr(x) for x in names[:n]) + more


def load_weights(module: nn.Module, folder: Path,
                 keep_prefixes: tuple[str, ...] | None = None) -> nn.Module:
    """Load a component folder's safetensors into ``module`` (strict, validated).

    ``keep_prefixes`` reads only some tensors, e.g. the decoder half of a full VAE
    (``("decoder.", "post_quant_conv.")``).
    """
    paths = find_weights(folder)
    tensors = read_safetensors(paths)
    if keep_prefixes:
        tensors = {k: v for k, v in tensors.items() if k.startswith(keep_prefixes)}
    check_state_dict(module, tensors, where=str(paths[0]))
    module.load_state_dict(tensors, strict=True, assign=True)
    return module


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write a state dict as safetensors (contiguous copies; no pickles)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path),
              metadata={"format": "pt"})
