"""Weight-compression config in three levels, mirroring ``coremltools.optimize.coreml``.

``CompressionConfig`` holds one spec for every op (``global_``), per op type (``op_type``:
``"conv"``, ``"linear"``, ...) and per op name (``op_name``); the most specific level wins and
``None`` leaves an op uncompressed. A spec is a :class:`PalettizeSpec` (n-bit look-up table)
or a :class:`QuantizeSpec` (int8 per-channel / int4 per-block), so one config can palettize
convs and quantize linears. The dataclasses are frozen and load strictly from YAML with
:func:`mobile_sd.config.from_dict` (unknown keys and bad values are errors listing what is
allowed):

>>> from mobile_sd.config import from_dict
>>> cfg = from_dict(CompressionConfig, {"global_": {"nbits": 6},
...                                     "op_type": {"linear": {"dtype": "int8"}},
...                                     "op_name": {"conv_out": None}})
>>> cfg.resolve("conv_in", "conv").nbits, cfg.resolve("proj", "linear").dtype
(6, 'int8')
>>> cfg.resolve("conv_out", "conv") is None
True
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterable, Literal, Optional, Union

from mobile_sd.errors import RecipeError

VALID_NBITS = (1, 2, 3, 4, 6, 8)


@dataclass(frozen=True)
class PalettizeSpec:
    """An n-bit look-up table per tensor or per group of ``group_size`` output channels.

    >>> PalettizeSpec(4, "per_grouped_channel", group_size=16).needs_ios18
    True
    """

    nbits: Literal[1, 2, 3, 4, 6, 8]
    granularity: Literal["per_tensor", "per_grouped_channel"] = "per_tensor"
    group_size: int = 16
    mode: Literal["kmeans", "uniform"] = "kmeans"

    def __post_init__(self) -> None:
        if self.nbits not in VALID_NBITS:
            raise RecipeError(f"PalettizeSpec.nbits: invalid value {self.nbits!r}; valid values: "
                              + ", ".join(map(str, VALID_NBITS)))
        _check_choice("PalettizeSpec.granularity", self.granularity,
                      ("per_tensor", "per_grouped_channel"))
        _check_choice("PalettizeSpec.mode", self.mode, ("kmeans", "uniform"))
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise RecipeError(f"PalettizeSpec.group_size must be a positive integer, "
                              f"got {self.group_size!r}")

    @property
    def needs_ios18(self) -> bool:
        # iOS16/17 LUTs (constexpr_lut_to_dense) hold 2, 4, 16, 64 or 256 entries: no 3-bit
        return self.granularity == "per_grouped_channel" or self.nbits == 3

    def describe(self) -> str:
        group = f"/{self.group_size}" if self.needs_ios18 else ""
        return f"{self.nbits}-bit {self.mode} {self.granularity}{group}"


@dataclass(frozen=True)
class QuantizeSpec:
    """Linear weight quantization: int8 per channel, or int4 per block (iOS18).

    >>> QuantizeSpec("int4", "per_block", block_size=32).needs_ios18
    True
    """

    dtype: Literal["int8", "int4"] = "int8"
    granularity: Literal["per_channel", "per_block", "per_tensor"] = "per_channel"
    block_size: int = 32
    mode: Literal["linear_symmetric", "linear"] = "linear_symmetric"

    def __post_init__(self) -> None:
        _check_choice("QuantizeSpec.dtype", self.dtype, ("int8", "int4"))
        _check_choice("QuantizeSpec.granularity", self.granularity,
                      ("per_channel", "per_block", "per_tensor"))
        _check_choice("QuantizeSpec.mode", self.mode, ("linear_symmetric", "linear"))
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise RecipeError(f"QuantizeSpec.block_size must be a positive integer, "
                              f"got {self.block_size!r}")

    @property
    def needs_ios18(self) -> bool:
        return self.dtype == "int4" or self.granularity == "per_block"

    def describe(self) -> str:
        block = f"/{self.block_size}" if self.granularity == "per_block" else ""
        return f"{self.dtype} {self.mode} {self.granularity}{block}"


Spec = Union[PalettizeSpec, QuantizeSpec]


@dataclass(frozen=True)
class CompressionConfig:
    """Specs at three levels; ``resolve(name, op_type)`` picks op name > op type > global.

    ``weight_threshold``: tensors with at most this many elements stay uncompressed (as in
    coremltools, whose default is also 2048).
    """

    global_: Optional[Spec] = None
    op_type: dict[str, Optional[Spec]] = field(default_factory=dict)
    op_name: dict[str, Optional[Spec]] = field(default_factory=dict)
    weight_threshold: int = 2048

    def __post_init__(self) -> None:
        for level in ("op_type", "op_name"):
            object.__setattr__(self, level, MappingProxyType(dict(getattr(self, level))))
            for key, spec in getattr(self, level).items():
                if spec is not None and not isinstance(spec, (PalettizeSpec, QuantizeSpec)):
                    raise RecipeError(f"CompressionConfig.{level}[{key!r}] must be a "
                                      f"PalettizeSpec, a QuantizeSpec or None, got {spec!r}")
        if self.weight_threshold < 0:
            raise RecipeError(f"CompressionConfig.weight_threshold must be >= 0, "
                              f"got {self.weight_threshold}")

    @classmethod
    def from_dict(cls, data: dict, where: str = "CompressionConfig") -> "CompressionConfig":
        """Strict loading with precise messages: a spec with ``nbits`` is a PalettizeSpec,
        one with ``dtype`` a QuantizeSpec.

        >>> CompressionConfig.from_dict({"global_": {"nbits": 5}})
        Traceback (most recent call last):
        ...
        mobile_sd.errors.RecipeError: CompressionConfig.global_.nbits: invalid value 5; valid values: 1, 2, 3, 4, 6, 8
        """
        from mobile_sd.config import from_dict

        if not isinstance(data, dict):
            raise RecipeError(f"{where}: expected a mapping, got {type(data).__name__}")
        data = dict(data)
        if "global_" in data:
            data["global_"] = _spec_from_dict(data["global_"], f"{where}.global_")
        for level in ("op_type", "op_name"):
            if isinstance(data.get(level), dict):
                data[level] = {k: _spec_from_dict(v, f"{where}.{level}.{k}")
                               for k, v in data[level].items()}
        return from_dict(cls, data, where, error=RecipeError)

    @classmethod
    def of(cls, spec: "Spec | CompressionConfig") -> "CompressionConfig":
        """A config from a single spec (applied globally), or the config itself."""
        return spec if isinstance(spec, CompressionConfig) else cls(global_=spec)

    def resolve(self, name: str, op_type: str) -> Optional[Spec]:
        if name in self.op_name:
            return self.op_name[name]
        if op_type in self.op_type:
            return self.op_type[op_type]
        return self.global_

    def specs(self) -> list[tuple[str, Spec]]:
        """Every spec with where it is set, e.g. ``("op_type['conv']", spec)``."""
        found = [("global_", self.global_)] + [
            (f"{level}[{key!r}]", spec) for level in ("op_type", "op_name")
            for key, spec in getattr(self, level).items()]
        return [(where, spec) for where, spec in found if spec is not None]

    def check_names(self, valid: Iterable[str], what: str = "op") -> None:
        """Raise RecipeError for an ``op_name`` key that is not among ``valid`` names."""
        valid = list(valid)
        for name in self.op_name:
            if name not in valid:
                close = difflib.get_close_matches(name, valid, n=5, cutoff=0.4) or valid[:5]
                raise RecipeError(f"CompressionConfig.op_name: no {what} named {name!r} in the "
                                  f"model; valid names include: {', '.join(close)}")

    def check_target(self, ios18: bool, target: str) -> None:
        """Raise RecipeError if a spec needs iOS18 and the model targets ``target``."""
        if ios18:
            return
        for where, spec in self.specs():
            if spec.needs_ios18:
                option, what, instead = _ios18_option(spec)
                raise RecipeError(
                    f"{where}: {what} {option!r} needs minimum_deployment_target iOS18, but "
                    f"the model targets {target}; convert with "
                    f"minimum_deployment_target=ct.target.iOS18 or use {instead}")


def _ios18_option(spec: Spec) -> tuple:
    """(value, what it is, what to use instead) of the option that needs iOS18."""
    if isinstance(spec, PalettizeSpec):
        if spec.granularity == "per_grouped_channel":
            return spec.granularity, "palettization granularity", "per_tensor"
        return spec.nbits, "palettization nbits", "nbits 2 or 4"
    if spec.dtype == "int4":
        return spec.dtype, "quantization dtype", "int8 per_channel"
    return spec.granularity, "quantization granularity", "int8 per_channel"


def _spec_from_dict(data, where: str) -> Optional[Spec]:
    from mobile_sd.config import from_dict

    if data is None or isinstance(data, (PalettizeSpec, QuantizeSpec)):
        return data
    if not isinstance(data, dict) or not ({"nbits", "dtype"} & set(data)):
        raise RecipeError(f"{where}: expected null, a palettization spec (with 'nbits') or a "
                          f"quantization spec (with 'dtype'), got {data!r}")
    cls = PalettizeSpec if "nbits" in data else QuantizeSpec
    return from_dict(cls, data, where, error=RecipeError)


def _check_choice(where: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise RecipeError(f"{where}: invalid value {value!r}; valid values: "
                          + ", ".join(map(repr, allowed)))
