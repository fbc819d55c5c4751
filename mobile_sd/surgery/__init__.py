"""Graph surgery: rewrites of eager modules before export, one pass per file.

========================== ============================ ==============================================
name                       applies to                   what it does (every pass preserves numerics)
========================== ============================ ==============================================
attention_original         unet, text_encoder, decoder  matmul-softmax attention, no SDPA (XNNPACK)
split_einsum               unet, text_encoder, decoder  per-head einsum attention on (B,C,1,S) (ANE)
split_einsum_v2            unet, text_encoder, decoder  v1 + query chunks <= chunk_size (512)
linear_to_conv             unet, text_encoder, decoder  transformer layers as 1x1 convs on (B,C,1,S)
fp16_safe_attention_mask   text_encoder                 CLIP masks use -1e4 instead of -3.4e38
cfg_fold                   unet                         guidance folded into one batch-2 UNet call
xnnpack_group_norm         unet, decoder                GroupNorm as ops XNNPACK delegates
xnnpack_layer_norm         unet, text_encoder           LayerNorm as ops XNNPACK delegates
xnnpack_upsample           unet, decoder                nearest 2x upsample folded into its conv
xnnpack_geglu              unet                         GEGLU's chunk as two slices
xnnpack_attention          unet, text_encoder, decoder  softmax scale folded into the query
xnnpack_conv_split         unet, decoder                fp32 convs over > 640 input channels chunked
v_to_epsilon               unet                         v-prediction output as epsilon (Swift app)
========================== ============================ ==============================================

The ``xnnpack_*`` passes are written as modules (module-level ``applies_to`` and
``apply(module) -> count``); the registry wraps them in :class:`ModulePass`.

Every pass rewrites in place and returns the root to continue with (``cfg_fold`` returns a
wrapper). Typical lists (``apply_passes`` runs them in the order given):

* ExecuTorch / XNNPACK: ``["attention_original", *xnnpack_passes_for(c), "cfg_fold"]`` for
  the UNet, ``["attention_original", *xnnpack_passes_for(c)]`` for the text encoder and decoder.
* Core ML / ANE: ``["linear_to_conv", "split_einsum_v2", "cfg_fold"]`` for the UNet,
  ``["linear_to_conv", "split_einsum", "fp16_safe_attention_mask"]`` for the text encoder,
  ``["linear_to_conv", "split_einsum_v2"]`` for the decoder.

Example (not run by the tests: it needs real artifacts)::

    get_pass("split_einsum_v2", chunk_size=256)
    # -> SplitEinsumV2AttentionPass(chunk_size=256)
    unet = apply_passes(unet, ["attention_original", "cfg_fold"], "unet")
"""
from __future__ import annotations

import importlib
import types
from functools import partial
from typing import TYPE_CHECKING, Sequence

from mobile_sd.errors import RecipeError
from mobile_sd.surgery.base import COMPONENTS, Component, SurgeryPass  # no diffusers here

if TYPE_CHECKING:
    from torch import nn

# name -> (module, class); class None: the module itself is the pass (see ModulePass).
# Imported on first use: listing names must not import diffusers.
_PASSES: dict[str, tuple[str, str | None]] = {
    "attention_original": ("mobile_sd.surgery.attention_original", "AttentionOriginalPass"),
    "split_einsum": ("mobile_sd.surgery.split_einsum", "SplitEinsumAttentionPass"),
    "split_einsum_v2": ("mobile_sd.surgery.split_einsum", "SplitEinsumV2AttentionPass"),
    "linear_to_conv": ("mobile_sd.surgery.linear_to_conv", "LinearToConvPass"),
    "fp16_safe_attention_mask": ("mobile_sd.surgery.fp16_safe_attention_mask",
                                 "Fp16SafeAttentionMaskPass"),
    "cfg_fold": ("mobile_sd.surgery.cfg_fold", "CfgFoldPass"),
    "xnnpack_group_norm": ("mobile_sd.surgery.xnnpack_group_norm", None),
    "xnnpack_layer_norm": ("mobile_sd.surgery.xnnpack_layer_norm", None),
    "xnnpack_upsample": ("mobile_sd.surgery.xnnpack_upsample", None),
    "xnnpack_geglu": ("mobile_sd.surgery.xnnpack_geglu", None),
    "xnnpack_attention": ("mobile_sd.surgery.xnnpack_attention", None),
    "xnnpack_conv_split": ("mobile_sd.surgery.xnnpack_conv_split", None),
    "v_to_epsilon": ("mobile_sd.surgery.v_to_epsilon", "VToEpsilonPass"),
}
PASS_NAMES: tuple[str, ...] = tuple(_PASSES)
# Each of these picks the attention kernel; a list naming two of them is a mistake.
_KERNEL_PASSES = frozenset({"attention_original", "split_einsum", "split_einsum_v2"})


def get_pass(name: str, **options) -> SurgeryPass:
    """The pass registered as ``name``, built with ``options`` (e.g. ``chunk_size=256``)."""
    if name not in _PASSES:
        raise RecipeError(f"unknown surgery pass {name!r}; valid names: {', '.join(PASS_NAMES)}")
    module_name, class_name = _PASSES[name]
    module = importlib.import_module(module_name)
    build = getattr(module, class_name) if class_name else partial(ModulePass, name, module)
    try:
        return build(**options)
    except TypeError as exc:
        raise RecipeError(f"surgery pass {name!r} does not take options "
                          f"{', '.join(sorted(options))}: {exc}") from exc


def xnnpack_passes_for(component: Component, precision: str | None = None) -> list[str]:
    """The ``xnnpack_*`` rewrites that apply to ``component`` (exported at ``precision``; None:
    any), in registry order: ``xnnpack_attention`` belongs after the attention kernel pass and
    ``xnnpack_conv_split`` after ``xnnpack_upsample`` (see :func:`apply_passes`)."""
    passes = [get_pass(name) for name in PASS_NAMES if name.startswith("xnnpack_")]
    return [p.name for p in passes if component in p.applies_to
            and (precision is None or not p.precisions or precision in p.precisions)]


class ModulePass(SurgeryPass):
    """A pass written as a module: ``applies_to`` and ``apply(module) -> count`` (in place)
    at module level."""

    def __init__(self, name: str, module: types.ModuleType):
        self.name = name
        self.applies_to = frozenset(module.applies_to)
        self.precisions = tuple(getattr(module, "precisions", ()))
        self.__doc__ = module.__doc__
        self._apply = module.apply

    def apply(self, module: "nn.Module") -> "nn.Module":
        self._apply(module)
        return module


def apply_passes(module: "nn.Module", names: Sequence[str | SurgeryPass],
                 component: Component) -> "nn.Module":
    """Apply the passes ``names`` (names or pass objects) to ``module``, a ``component``.

    Every pass is resolved and checked before the first one runs. Order: passes run as listed.
    ``linear_to_conv``, the attention-kernel passes and ``fp16_safe_attention_mask`` compose
    in any order (each carries the others' choices over); the ``xnnpack_*`` rewrites of norms,
    upsamplers and GEGLU may go anywhere; ``xnnpack_attention`` is exact anywhere but only
    removes the score multiply from attentions whose kernel is already chosen (run it after
    ``attention_original``); ``xnnpack_conv_split`` only rewrites plain convs, so it leaves the
    upsamplers' convs plain unless it runs before ``xnnpack_upsample``; ``cfg_fold`` changes
    the forward signature,
    so it must come last (enforced). Returns the module to continue with.
    """
    if component not in COMPONENTS:
        raise RecipeError(f"unknown component {component!r}; valid components: "
                          f"{', '.join(COMPONENTS)}")
    passes = [get_pass(p) if isinstance(p, str) else p for p in names]
    for p in passes:
        if not isinstance(p, SurgeryPass):
            raise RecipeError(f"expected a surgery pass name or SurgeryPass, got {p!r}")
    _check_list(passes, component)
    for surgery in passes:
        module = surgery.apply(module)
    return module


def _check_list(passes: list[SurgeryPass], component: str) -> None:
    listed = [p.name for p in passes]
    for p in passes:
        if component not in p.applies_to:
            raise RecipeError(f"surgery pass {p.name!r} does not apply to the {component}; it "
                              f"applies to: {', '.join(sorted(p.applies_to))}")
    twice = sorted({n for n in listed if listed.count(n) > 1})
    if twice:
        raise RecipeError(f"surgery pass {', '.join(map(repr, twice))} listed more than once")
    kernels = [n for n in listed if n in _KERNEL_PASSES]
    if len(kernels) > 1:
        raise RecipeError(f"surgery passes {', '.join(map(repr, kernels))} each choose the "
                          f"attention kernel; list at most one of them")
    for p in passes[:-1]:
        if p.returns_wrapper:
            raise RecipeError(f"surgery pass {p.name!r} wraps the module and changes its "
                              f"inputs, so it must be the last pass; got order {listed}")


__all__ = ["PASS_NAMES", "COMPONENTS", "ModulePass", "SurgeryPass", "apply_passes", "get_pass",
           "xnnpack_passes_for"]
