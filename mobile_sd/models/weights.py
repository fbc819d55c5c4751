"""Reading and writing component weights: safetensors only, validated tensor by tensor.

Nothing is ever unpickled: a folder that holds only ``.bin`` / ``.ckpt`` / ``.pt`` weights is
refused with the command that converts it.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mobile_sd.config import one_line, read_text
from mobile_sd.errors import InvalidArgumentError, TensorMismatchError, WeightsError

SAFETENSORS_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
STEMS = tuple(name.removesuffix(".safetensors") for name in SAFETENSORS_NAMES)
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
CONVERT_HINT = ("convert it once, on a machine where you trust the file, with: python -c "
                "\"import torch, safetensors.torch as s; s.save_file(torch.load('IN', "
                "weights_only=True), 'OUT.safetensors')\" (for diffusers folders, "
                "`pipe.save_pretrained(dir, safe_serialization=True)` does the same)")
_VARIANT = r"[A-Za-z0-9_]+(?:-[A-Za-z0-9_]+)*"
_STEM = "|".join(re.escape(s) for s in STEMS)
# A variant file is STEM.VARIANT.safetensors; sharded variants have an index named the way
# diffusers/transformers name it (STEM.safetensors.index.VARIANT.json) or STEM.VARIANT.safetensors
# .index.json. Shards themselves (STEM.VARIANT-00001-of-00002.safetensors) are not variants.
_VARIANT_FILES = (re.compile(rf"^(?:{_STEM})\.({_VARIANT})\.safetensors$"),
                  re.compile(rf"^(?:{_STEM})\.safetensors\.index\.({_VARIANT})\.json$"),
                  re.compile(rf"^(?:{_STEM})\.({_VARIANT})\.safetensors\.index\.json$"))
_SHARD = re.compile(r"-\d+-of-\d+$")


@dataclass(frozen=True)
class WeightsInfo:
    """What :func:`load_weights` read: the files, the variant (``fp16``...) and the dtype(s) the
    floating-point tensors were stored in (``float16``; ``float16+float32`` when mixed) before
    they were cast to the module's fp32."""
    files: tuple[str, ...]
    variant: str | None
    stored_dtype: str


def check_variant(variant: str | None) -> str | None:
    """``variant`` if it is a plain name like ``fp16`` (it becomes part of a file name)."""
    if variant is not None and not re.fullmatch(_VARIANT, variant):
        raise InvalidArgumentError(f"variant {variant!r}: expected a name like 'fp16' or 'bf16' "
                                   "(letters, digits, '_', '-')")
    return variant


def variants_in(folder: Path) -> list[str]:
    """The weight variants (``fp16``, ``bf16``...) present in a component folder."""
    found = set()
    for path in folder.iterdir():
        for pattern in _VARIANT_FILES:
            match = pattern.match(path.name)
            if match and not _SHARD.search(match.group(1)):
                found.add(match.group(1))
    return sorted(found)


def _index_names(name: str, variant: str | None) -> list[str]:
    if variant is None:
        return [f"{name}.index.json"]
    stem = name.removesuffix(".safetensors")
    return [f"{name}.index.{variant}.json", f"{stem}.{variant}.safetensors.index.json"]


def _weight_names(variant: str | None) -> list[tuple[str, list[str]]]:
    """(single-file name, index names) for each weights name, in order of preference."""
    out = []
    for name in SAFETENSORS_NAMES:
        single = name if variant is None else name.replace(".safetensors", f".{variant}.safetensors")
        out.append((single, _index_names(name, variant)))
    return out


def read_index(index: Path) -> list[Path]:
    """The shard files a ``*.safetensors.index.json`` lists (validated; shards beside it)."""
    text = read_text(index, WeightsError)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{index}: not a valid safetensors index (invalid JSON: "
                           f"{one_line(exc)})") from None
    except RecursionError:
        raise WeightsError(f"{index}: not a valid safetensors index (nested too deeply)") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if (not isinstance(weight_map, dict) or not weight_map
            or not all(isinstance(v, str) for v in weight_map.values())):
        got = ("no 'weight_map'" if not isinstance(data, dict) or "weight_map" not in data
               else f"a {type(weight_map).__name__}" if not isinstance(weight_map, dict)
               else "an empty or non-string map")
        raise WeightsError(f"{index}: not a valid safetensors index: 'weight_map' must be a "
                           f"non-empty object mapping tensor names to shard file names (got {got})")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if Path(shard).name != shard or shard in (".", "..") or not shard.endswith(".safetensors"):
            raise WeightsError(f"{index}: shard {shard!r} is not a .safetensors file name in the "
                               "index's own folder; shards must sit beside their index")
        if not (index.parent / shard).is_file():
            raise WeightsError(f"{index.parent / shard}: shard listed in {index.name} is missing")
    return [index.parent / s for s in shards]


def _find(folder: Path, variant: str | None) -> list[Path] | None:
    for single, indexes in _weight_names(variant):
        if (folder / single).is_file():
            return [folder / single]
        for name in indexes:
            if (folder / name).is_file():
                return read_index(folder / name)
    return None


def find_weights(folder: Path, variant: str | None = None) -> tuple[list[Path], str | None]:
    """The safetensors file(s) of a component folder and the variant they are.

    With ``variant`` (``"fp16"``, like diffusers' ``variant=``): ``STEM.fp16.safetensors`` or its
    sharded index, else an error naming the missing file. Without: the plain
    ``STEM.safetensors`` (or its index); when there is none but exactly one variant, that variant
    (a folder holding only ``*.fp16.safetensors`` is meant to be loaded; several variants and no
    plain file is ambiguous: an error asks for ``variant``).
    """
    check_variant(variant)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: not a folder")
    if variant is not None:
        paths = _find(folder, variant)
        if paths is None:
            stems = [s for s in STEMS if any(p.name.startswith(s + ".") for p in folder.iterdir())]
            wanted = [f"{s}.{variant}.safetensors" for s in (stems or STEMS)]
            held = ((["plain weights"] if _find(folder, None) is not None else [])
                    + [f"variant {v!r}" for v in variants_in(folder)])
            raise WeightsError(
                f"{folder / wanted[0]}: missing (variant {variant!r} was requested"
                + (f"; nor {', '.join(wanted[1:])}" if wanted[1:] else "")
                + f", nor a sharded index); {folder.name}/ holds "
                + (" and ".join(held) if held else "no safetensors weights")
                + (" (drop --variant, or pass one it holds)" if held else ""))
        return paths, variant
    paths = _find(folder, None)
    if paths is not None:
        return paths, None
    present = variants_in(folder)
    if len(present) == 1:
        return _find(folder, present[0]), present[0]
    if len(present) > 1:
        raise WeightsError(f"{folder}: no plain weights file but variants "
                           f"{', '.join(present)}; choose one with variant= (--variant "
                           f"{present[0]})")
    singles = sorted(folder.glob("*.safetensors"))
    if len(singles) == 1:
        return singles, None
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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cast_to_module(module: nn.Module, tensors: dict[str, torch.Tensor],
                   where: str) -> dict[str, torch.Tensor]:
    """Cast floating tensors to the dtype the module holds (fp16/bf16 files load into fp32).

    A non-floating tensor where the module holds a floating one (or the reverse) is a
    :class:`TensorMismatchError`: quantized weights need their own loader.
    """
    expected = module.state_dict()
    out = {}
    for name, tensor in tensors.items():
        want = expected.get(name)
        if want is not None and tensor.dtype != want.dtype:
            if tensor.is_floating_point() != want.is_floating_point():
                raise TensorMismatchError(
                    f"{where}: tensor {name!r} is {_dtype_name(tensor.dtype)} in the file but the "
                    f"model holds {_dtype_name(want.dtype)}; only float16/bfloat16/float32 "
                    "weights are read")
            tensor = tensor.to(want.dtype)
        out[name] = tensor
    return out


def load_weights(module: nn.Module, folder: Path, keep_prefixes: tuple[str, ...] | None = None,
                 variant: str | None = None,
                 rename: Callable[[dict[str, torch.Tensor], str], dict[str, torch.Tensor]]
                 | None = None) -> WeightsInfo:
    """Load a component folder's safetensors into ``module`` (strict, validated, cast to the
    module's dtype) and say what was read.

    ``keep_prefixes`` reads only some tensors, e.g. the decoder half of a full VAE
    (``("decoder.", "post_quant_conv.")``); ``variant`` picks ``*.{variant}.safetensors`` (see
    :func:`find_weights`); ``rename(tensors, where)`` maps other naming schemes to the module's
    (e.g. transformers 4.x CLIP names).
    """
    paths, found_variant = find_weights(folder, variant)
    tensors = read_safetensors(paths)
    where = str(paths[0])
    if keep_prefixes:
        tensors = {k: v for k, v in tensors.items() if k.startswith(keep_prefixes)}
    if rename is not None:
        tensors = rename(tensors, where)
    stored = sorted({_dtype_name(t.dtype) for t in tensors.values() if t.is_floating_point()})
    check_state_dict(module, tensors, where=where)
    tensors = cast_to_module(module, tensors, where)
    module.load_state_dict(tensors, strict=True, assign=True)
    return WeightsInfo(files=tuple(str(p) for p in paths), variant=found_variant,
                       stored_dtype="+".join(stored) or "none")


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write a state dict as safetensors (contiguous copies; no pickles)."""
    from safetensors.torch import save_file

    from mobile_sd.utils.files import default_file_mode

    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path),
              metadata={"format": "pt"})
    Path(path).chmod(default_file_mode())  # safetensors writes via a 0600 temp file
