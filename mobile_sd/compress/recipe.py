"""The ``compression:`` sections of ``format: coreml`` recipes -> :class:`CompressionConfig`.

A section has the three levels of :class:`~mobile_sd.compress.config.CompressionConfig`
(global < op type < op name; ``null`` at any level leaves those ops alone)::

    compression:
      global_: {nbits: 6, granularity: per_grouped_channel, group_size: 16}   # palettize
      op_type: {linear: {dtype: int8}}                                        # int8 linears
      op_name: {p_conv_out_weight: null}                                      # keep fp16
      weight_threshold: 2048

``op_type`` keys are MIL op types (``conv``, ``linear``, ``matmul``, ``conv_transpose``);
``op_name`` keys are weight names (the torch parameter path with ``.`` -> ``_`` and a ``p_``
prefix, as torch.export names them, e.g. ``p_down_blocks_1_attentions_0_proj_in_weight``);
they are checked against the model after conversion, and an unknown name is an error that
lists close valid ones.

Checks here, before any conversion (RecipeError, naming the key):

* what the deployment target cannot do: per-grouped-channel LUTs, int4, per-block scales and
  3-bit LUTs need iOS18 (the iOS17 ``constexpr_lut_to_dense`` takes 1, 2, 4, 6 or 8 bits);
* conflicting options: ``group_size`` without ``per_grouped_channel``, ``block_size`` without
  ``per_block``.

>>> cfg = parse_compression({"global_": {"nbits": 6}}, "iOS17", "recipe.yaml: compression")
>>> cfg.global_.describe()
'6-bit kmeans per_tensor'
>>> parse_compression({"global_": {"nbits": 3}}, "iOS17", "compression")
Traceback (most recent call last):
...
mobile_sd.errors.RecipeError: compression.global_: 3-bit palettization needs target iOS18 (the iOS17 LUT op takes 1, 2, 4, 6, 8 bits); use nbits 2 or 4, or target: iOS18
"""
from __future__ import annotations

from typing import Any

from mobile_sd.compress.config import CompressionConfig, PalettizeSpec
from mobile_sd.errors import RecipeError

IOS17_NBITS = (1, 2, 4, 6, 8)
# Option -> (the setting it belongs to, the value that setting must have).
_NEEDS = {"group_size": ("granularity", "per_grouped_channel"),
          "block_size": ("granularity", "per_block")}


def parse_compression(raw: Any, target: str, where: str) -> CompressionConfig | None:
    """Validate a recipe's compression section for ``target``; ``None`` stays ``None``.

    An already parsed :class:`CompressionConfig` is re-checked against ``target`` (recipes
    are parsed once per component override and once for the recipe-wide section).
    """
    if raw is None:
        return None
    if isinstance(raw, CompressionConfig):
        config = raw
    else:
        if not isinstance(raw, dict):
            raise RecipeError(f"{where}: expected a mapping with global_, op_type, op_name, "
                              f"weight_threshold (or null), got {type(raw).__name__} {raw!r}")
        _check_conflicts(raw, where)
        config = CompressionConfig.from_dict(raw, where)
    _check_target(config, target, where)
    return config


def _raw_specs(raw: dict, where: str):
    """(where, spec dict) for each spec written in the section."""
    if isinstance(raw.get("global_"), dict):
        yield f"{where}.global_", raw["global_"]
    for level in ("op_type", "op_name"):
        entries = raw.get(level)
        if isinstance(entries, dict):
            for key, spec in entries.items():
                if isinstance(spec, dict):
                    yield f"{where}.{level}.{key}", spec


def _check_conflicts(raw: dict, where: str) -> None:
    for at, spec in _raw_specs(raw, where):
        for option, (setting, needed) in _NEEDS.items():
            if option in spec and spec.get(setting) != needed:
                raise RecipeError(f"{at}: {option} applies only with {setting}: {needed}, but "
                                  f"{setting} is {spec.get(setting, 'the default')!r}; remove "
                                  f"{option} or set {setting}: {needed}")


def _check_target(config: CompressionConfig, target: str, where: str) -> None:
    ios18 = target == "iOS18"
    if not ios18:
        for at, spec in config.specs():
            if isinstance(spec, PalettizeSpec) and spec.nbits not in IOS17_NBITS:
                raise RecipeError(
                    f"{where}.{at}: {spec.nbits}-bit palettization needs target iOS18 (the "
                    f"{target} LUT op takes {', '.join(map(str, IOS17_NBITS))} bits); use "
                    "nbits 2 or 4, or target: iOS18")
    try:
        config.check_target(ios18, target)
    except RecipeError as exc:
        raise RecipeError(f"{where}.{exc}") from None


def check_mixed_bit(mixed_bit: Any, config: CompressionConfig | None, target: str,
                    where: str) -> None:
    """Mixed-bit palettization chooses ``nbits`` per weight: it needs a palettization spec to
    take the rest (granularity, mode) from, and candidate bits the target can store."""
    if mixed_bit is None:
        return
    if palettization(config) is None:
        raise RecipeError(f"{where}: mixed_bit chooses palettization bits per layer, but the "
                          "UNet's compression has no palettization global_ spec (it is "
                          f"{'null' if config is None else config.global_}); set "
                          "compression.global_: {nbits: 6} or remove mixed_bit")
    allowed = IOS17_NBITS if target != "iOS18" else (1, 2, 3, 4, 6, 8)
    bad = [b for b in mixed_bit.candidate_bits if b not in allowed]
    if bad or len(mixed_bit.candidate_bits) < 2:
        raise RecipeError(f"{where}: candidate_bits must list at least two of "
                          f"{', '.join(map(str, allowed))} for target {target}; got "
                          f"{list(mixed_bit.candidate_bits)}")
    if mixed_bit.target_size_mb <= 0 or mixed_bit.max_layers < 1:
        raise RecipeError(f"{where}: target_size_mb must be > 0 and max_layers >= 1; got "
                          f"{mixed_bit.target_size_mb} and {mixed_bit.max_layers}")


def palettization(config: CompressionConfig | None) -> PalettizeSpec | None:
    """The recipe-wide palettization spec of ``config`` (``global_``), if it is one."""
    spec = config.global_ if config is not None else None
    return spec if isinstance(spec, PalettizeSpec) else None
