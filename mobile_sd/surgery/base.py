"""Shared pieces of the surgery passes: the pass base class, module replacement, layouts.

Two activation layouts appear in the passes:

* ``bsc``  -- ``(batch, sequence, channels)``, what diffusers and transformers use;
* ``bc1s`` -- ``(batch, channels, 1, sequence)``, what the Apple Neural Engine wants: channels
  on axis 1 so that 1x1 ``conv`` ops and channel reductions run in its native layout.

Attention modules owned by mobile-sd (:class:`KernelAttention`) keep the ``softmax(QK^T)V`` step
in a child module called ``kernel``; the attention passes swap that child, so they compose with
each other and with ``linear_to_conv`` in either order.
"""
from __future__ import annotations

import abc
from typing import Callable, ClassVar, Literal

import torch
from torch import nn

from mobile_sd.names import COMPONENT_NAMES
from mobile_sd.errors import InvalidArgumentError, RecipeError

Component = Literal["unet", "text_encoder", "decoder"]
COMPONENTS: tuple[str, ...] = COMPONENT_NAMES
Layout = Literal["bsc", "bc1s"]


class SurgeryPass(abc.ABC):
    """A graph rewrite applied to an eager ``nn.Module`` before export.

    ``apply`` rewrites the module **in place** (by replacing submodules) and returns the root,
    which is a new object only when the root itself was replaced (or wrapped, for passes with
    ``returns_wrapper``): always continue with the returned module. A pass checks every module
    it will touch before it touches any, so an error leaves the module unchanged.
    """

    name: ClassVar[str]
    applies_to: ClassVar[frozenset[str]]
    # A wrapper changes the forward signature, so it must be the last pass of a list.
    returns_wrapper: ClassVar[bool] = False
    # Export precisions the rewrite is meant for (empty: all); the rewrite is exact at any.
    precisions: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def apply(self, module: nn.Module) -> nn.Module:
        """Rewrite ``module`` (see the class docstring for in-place semantics)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# ----------------------------------------------------------------------------- module helpers

def find_modules(root: nn.Module, types: type | tuple[type, ...]) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every submodule of ``root`` (root included) of ``types``."""
    return [(name, mod) for name, mod in root.named_modules() if isinstance(mod, types)]


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``root.<name>``; returns the root (``new`` itself when ``name`` is '')."""
    if not name:
        return new
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)  # nn.ModuleList accepts "0", "1"... as attribute names too
    return root


def replace_all(root: nn.Module, targets: list[tuple[str, nn.Module]],
                build: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """Replace each ``(name, module)`` of ``targets`` by ``build(module)``; returns the root."""
    for name, mod in targets:
        root = replace_module(root, name, build(mod))
    return root


def where(name: str) -> str:
    """A module path for error messages ('<root>' for the root)."""
    return name or "<root>"


# ----------------------------------------------------------------------------- layouts

def to_bc1s(x: torch.Tensor) -> torch.Tensor:
    """``(B, S, C)`` -> ``(B, C, 1, S)``."""
    return x.transpose(1, 2).unsqueeze(2)


def to_bsc(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, 1, S)`` -> ``(B, S, C)``."""
    return x.squeeze(2).transpose(1, 2)


# ----------------------------------------------------------------------------- attention

class KernelAttention(nn.Module):
    """Base of mobile-sd's attention modules: ``self.kernel`` computes ``softmax(QK^T s + b)V``.

    A kernel is called as ``kernel(q, k, v, heads, scale, bias, layout)`` with q/k/v in
    ``layout`` and ``bias`` additive, broadcastable to ``(B, heads, Sq, Sk)`` (or None).
    """

    kernel: nn.Module


class KernelAttnProcessor:
    """diffusers attention processor that delegates ``softmax(QK^T)V`` to a kernel module.

    Same features as diffusers' ``AttnProcessor`` (group norm, 4-D spatial input, cross-attention
    norm, residual, output rescale, additive masks); projections stay ``nn.Linear`` (``bsc``).
    A plain object, not an ``nn.Module``, like diffusers' own processors.
    """

    def __init__(self, kernel: nn.Module):
        self.kernel = kernel

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        residual = hidden_states
        spatial = hidden_states.ndim == 4
        if spatial:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.reshape(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        out = self.kernel(q, k, v, attn.heads, attn.scale, diffusers_bias(attention_mask), "bsc")
        out = attn.to_out[1](attn.to_out[0](out))
        if spatial:
            out = out.transpose(1, 2).reshape(b, -1, h, w)
        if attn.residual_connection:
            out = out + residual
        # A divide by 1.0 still exports (and in int8 costs two requantizing converts).
        return out if attn.rescale_output_factor == 1.0 else out / attn.rescale_output_factor

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kernel={self.kernel!r})"


def diffusers_bias(mask: torch.Tensor | None) -> torch.Tensor | None:
    """diffusers' additive mask ``(B, 1|Sq, Sk)`` -> ``(B, 1, 1|Sq, Sk)`` (same for all heads)."""
    if mask is None or mask.ndim == 4:
        return mask
    if mask.ndim != 3:
        raise InvalidArgumentError(f"expected an additive attention mask of shape (batch, 1 or "
                                   f"queries, keys), got shape {tuple(mask.shape)}")
    return mask.unsqueeze(1)


def check_plain_attention(attn: nn.Module, name: str, pass_name: str,
                          processors: tuple[type, ...]) -> None:
    """Raise RecipeError unless diffusers ``Attention`` ``attn`` uses only the features that
    ``AttnProcessor`` / :class:`KernelAttnProcessor` / ``ConvAttention`` implement."""
    unsupported = {
        "spatial_norm": attn.spatial_norm is not None,
        "qk_norm": getattr(attn, "norm_q", None) is not None,
        "added_kv_proj_dim": attn.added_kv_proj_dim is not None,
        "kv_heads != heads": attn.inner_kv_dim != attn.inner_dim,
        "fused projections": attn.fused_projections,
    }
    found = [feature for feature, present in unsupported.items() if present]
    if found:
        raise RecipeError(f"{pass_name}: attention {where(name)} uses {', '.join(found)}, which "
                          f"this pass does not implement; remove {pass_name!r} from the recipe")
    if not isinstance(attn.processor, processors):
        raise RecipeError(
            f"{pass_name}: attention {where(name)} uses processor "
            f"{type(attn.processor).__name__} (adapters, LoRA...); only "
            f"{', '.join(p.__name__ for p in processors)} can be replaced: fuse or unload "
            f"adapters before surgery")


def unet_output(out) -> torch.Tensor:
    """The prediction of a UNet call: a tensor, diffusers' ``.sample``, or the first item of a
    tuple (what wrapper passes call the UNet they wrap with)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    return out[0]
