"""``linear_to_conv``: transformer blocks on the ANE layout ``(B, C, 1, S)`` with 1x1 convs.

The Neural Engine runs 1x1 ``conv`` on channels-first tensors far better than ``linear`` /
``matmul`` on ``(B, S, C)`` (ane.md rule E8). Every ``nn.Linear`` of the attention and
feed-forward layers becomes an ``nn.Conv2d(kernel_size=1)`` with the same weights viewed as
``(out, in, 1, 1)`` (no copy); every ``nn.LayerNorm`` becomes :class:`ChannelLayerNorm`, which
normalizes over axis 1. A block's whole forward runs in that layout; converting happens only
at the boundaries of the container.

Before / after, UNet (every diffusers ``Transformer2DModel``; ``proj_in`` / ``proj_out`` are
1x1 convs or, with ``use_linear_projection``, linears: both end up 1x1 convs)::

    x (B,C,H,W) -> GroupNorm -> proj_in                    x (B,C,H,W) -> GroupNorm -> proj_in (conv)
    -> permute + reshape (B,HW,C)                          -> reshape (B,C,1,HW)       (free: a view)
    -> BasicTransformerBlock x N on (B,HW,C):              -> ConvTransformerBlock x N on (B,C,1,HW):
         LayerNorm, Attention (Linear q/k/v/out),               ChannelLayerNorm, ConvAttention (conv
         FeedForward (Linear, GEGLU chunk on dim -1)            q/k/v/out), FF (conv, GEGLU on dim 1)
    -> reshape + permute (B,C,H,W) -> proj_out -> + x      -> reshape (B,C,H,W) -> proj_out (conv) -> + x

The text context ``(B, 77, D)`` is transposed once per ``Transformer2DModel`` to ``(B, D, 1, 77)``.

Text encoder: ``CLIPEncoder`` -> ``ConvCLIPEncoder`` (in: ``(B,S,C)`` -> ``(B,C,1,S)`` once,
all layers in that layout, out: back once). Decoder: every remaining diffusers ``Attention``
(the VAE mid-block's spatial attention) -> ``ConvAttention`` ((B,C,H,W) is viewed as
(B,C,1,HW): no transpose at all).

The attention kernel is carried over (``split_einsum`` before this pass keeps working; plain
matmul attention otherwise), as is ``fp16_safe_attention_mask``'s mask floor. Rewrites in place;
parameters are shared with the original modules, but their shapes (and so state_dict shapes)
change. Inference only: dropout layers of attention outputs are dropped.

Not supported (RecipeError names the module): ada-norm / positional-embedding / gated
transformer blocks, SwiGLU feed-forwards, attention with spatial norm, qk norm, added KV,
cross-attention norm, fused projections, adapter processors, transformer blocks outside a
``Transformer2DModel``; ``output_hidden_states`` of the rewritten CLIP encoder.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.activations import GEGLU, GELU, ApproximateGELU, LinearActivation
from diffusers.models.attention import BasicTransformerBlock, FeedForward
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.clip.modeling_clip import (CLIPAttention, CLIPEncoder, CLIPEncoderLayer,
                                                    CLIPMLP)

from mobile_sd.errors import InvalidArgumentError, RecipeError
from mobile_sd.surgery.attention_original import AttentionBias, CLIPSelfAttention, MatmulAttention
from mobile_sd.surgery.base import (COMPONENTS, KernelAttention, KernelAttnProcessor, SurgeryPass,
                                    check_plain_attention, diffusers_bias, find_modules,
                                    replace_all, to_bc1s, to_bsc, where)

PASS = "linear_to_conv"
_PROCESSORS = (AttnProcessor, AttnProcessor2_0, KernelAttnProcessor)
_FF_ACTIVATIONS = (GEGLU, GELU, ApproximateGELU, LinearActivation)


# ----------------------------------------------------------------------------- layers

def conv_from_linear(linear: nn.Linear) -> nn.Conv2d:
    """A 1x1 ``nn.Conv2d`` sharing ``linear``'s weights (viewed ``(out, in, 1, 1)``) and bias."""
    conv = nn.Conv2d(linear.in_features, linear.out_features, 1, bias=linear.bias is not None,
                     device="meta")  # meta: skip a random init that is overwritten at once
    weight = linear.weight
    conv.weight = nn.Parameter(weight.detach().view(*weight.shape, 1, 1),
                               requires_grad=weight.requires_grad)
    if linear.bias is not None:
        conv.bias = linear.bias
    return conv


class ChannelLayerNorm(nn.Module):
    """``nn.LayerNorm`` over axis 1 of ``(B, C, 1, S)`` (same parameters, same result)."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.eps = norm.eps
        self.register_parameter("weight", norm.weight)  # None without elementwise_affine
        self.register_parameter("bias", norm.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centered = x - x.mean(dim=1, keepdim=True)
        out = centered * torch.rsqrt((centered * centered).mean(dim=1, keepdim=True) + self.eps)
        if self.weight is not None:
            out = out * self.weight.view(1, -1, 1, 1)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out


class ConvAttention(KernelAttention):
    """Attention with 1x1-conv projections on ``(B, C, 1, S)``.

    Also takes ``(B, C, H, W)`` (viewed as ``(B, C, 1, HW)``, as diffusers' spatial attention is
    called) and ``(B, S, C)`` (transposed at the boundary); returns the input's layout.
    """

    def __init__(self, to_q, to_k, to_v, to_out, heads: int, scale: float, kernel: nn.Module,
                 group_norm: nn.GroupNorm | None = None, residual_connection: bool = False,
                 rescale_output_factor: float = 1.0):
        super().__init__()
        self.group_norm = group_norm
        self.to_q, self.to_k, self.to_v, self.to_out = to_q, to_k, to_v, to_out
        self.heads, self.scale, self.kernel = heads, scale, kernel
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor

    @classmethod
    def from_diffusers(cls, attn: Attention) -> "ConvAttention":
        kernel = attn.processor.kernel if isinstance(attn.processor, KernelAttnProcessor) else (
            MatmulAttention())
        projections = (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0])
        return cls(*(conv_from_linear(p) for p in projections), attn.heads, attn.scale, kernel,
                   attn.group_norm, attn.residual_connection, attn.rescale_output_factor)

    @classmethod
    def from_clip(cls, attn: CLIPAttention | CLIPSelfAttention) -> "ConvAttention":
        if isinstance(attn, CLIPSelfAttention):
            heads, kernel = attn.heads, attn.kernel
        else:
            heads, kernel = attn.num_heads, MatmulAttention()
        return cls(*(conv_from_linear(p) for p in (attn.q_proj, attn.k_proj, attn.v_proj,
                                                   attn.out_proj)), heads, attn.scale, kernel)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states=None,
                attention_mask=None, temb=None) -> torch.Tensor:
        # temb only feeds a spatial norm, which from_diffusers' callers reject.
        x, restore = _as_bc1s(hidden_states)
        residual = x
        if self.group_norm is not None:
            x = self.group_norm(x)  # GroupNorm of (B, C, 1, HW) == of (B, C, H, W)
        context = x if encoder_hidden_states is None else _as_bc1s(encoder_hidden_states)[0]
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        bias = diffusers_bias(attention_mask)
        out = self.to_out(self.kernel(q, k, v, self.heads, self.scale, bias, "bc1s"))
        if self.residual_connection:
            out = out + residual
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return restore(out)


def _as_bc1s(x: torch.Tensor):
    """``x`` as ``(B, C, 1, S)`` and the function that puts a result back into x's layout."""
    if x.ndim == 3:
        return to_bc1s(x), to_bsc
    b, c, h, w = x.shape
    return x.reshape(b, c, 1, h * w), lambda y: y.reshape(b, y.shape[1], h, w)


class ConvGEGLU(nn.Module):
    """diffusers' ``GEGLU`` with a conv projection; the gate is split on the channel axis."""

    def __init__(self, proj: nn.Conv2d):
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=1)
        return x * F.gelu(gate)


def _convert_feed_forward(ff: FeedForward) -> FeedForward:
    """In place: FeedForward.forward just chains ``net``, so swapping its layers is enough."""
    act = ff.net[0]
    if isinstance(act, GEGLU):
        ff.net[0] = ConvGEGLU(conv_from_linear(act.proj))
    else:  # elementwise activations after a projection
        act.proj = conv_from_linear(act.proj)
    ff.net[2] = conv_from_linear(ff.net[2])
    return ff


# ----------------------------------------------------------------------------- UNet

class ConvTransformerBlock(nn.Module):
    """``BasicTransformerBlock`` (layer-norm type) on ``(B, C, 1, S)``."""

    def __init__(self, block: BasicTransformerBlock):
        super().__init__()
        self.only_cross_attention = block.only_cross_attention
        self.norm1 = ChannelLayerNorm(block.norm1)
        self.attn1 = ConvAttention.from_diffusers(block.attn1)
        self.norm2 = self.attn2 = None
        if block.attn2 is not None:
            self.norm2 = ChannelLayerNorm(block.norm2)
            self.attn2 = ConvAttention.from_diffusers(block.attn2)
        self.norm3, self.ff = ChannelLayerNorm(block.norm3), _convert_feed_forward(block.ff)

    def forward(self, x, context=None, self_bias=None, cross_bias=None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), context if self.only_cross_attention else None, self_bias) + x
        if self.attn2 is not None:
            x = self.attn2(self.norm2(x), context, cross_bias) + x
        return self.ff(self.norm3(x)) + x


class ConvTransformer2DModel(nn.Module):
    """Drop-in for a continuous-input ``Transformer2DModel`` (same call, same outputs)."""

    def __init__(self, model: Transformer2DModel):
        super().__init__()
        self.norm = model.norm
        self.proj_in = _as_conv(model.proj_in)
        self.transformer_blocks = nn.ModuleList(
            ConvTransformerBlock(block) for block in model.transformer_blocks)
        self.proj_out = _as_conv(model.proj_out)

    def forward(self, hidden_states, encoder_hidden_states=None, timestep=None,
                added_cond_kwargs=None, class_labels=None, cross_attention_kwargs=None,
                attention_mask=None, encoder_attention_mask=None, return_dict: bool = True):
        # timestep / class_labels / added_cond_kwargs only feed ada-norm blocks (rejected).
        if cross_attention_kwargs:
            raise InvalidArgumentError(
                f"ConvTransformer2DModel does not take cross_attention_kwargs, got "
                f"{sorted(cross_attention_kwargs)}: fuse LoRA / adapters before linear_to_conv")
        b, _, h, w = hidden_states.shape
        x = self.proj_in(self.norm(hidden_states))
        x = x.reshape(b, x.shape[1], 1, h * w)
        context = None if encoder_hidden_states is None else to_bc1s(encoder_hidden_states)
        self_bias = _key_bias(attention_mask, x.dtype)
        cross_bias = _key_bias(encoder_attention_mask, x.dtype)
        for block in self.transformer_blocks:
            x = block(x, context, self_bias, cross_bias)
        out = self.proj_out(x.reshape(b, x.shape[1], h, w)) + hidden_states
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


def _as_conv(proj: nn.Module) -> nn.Module:
    return conv_from_linear(proj) if isinstance(proj, nn.Linear) else proj


def _key_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Transformer2DModel's masks -> additive ``(B, 1, 1, S_k)`` (2-D: 1 keep, 0 discard)."""
    if mask is None:
        return None
    if mask.ndim == 2:  # the same conversion as Transformer2DModel.forward
        mask = ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)
    return mask.unsqueeze(1)


# ----------------------------------------------------------------------------- text encoder

class ConvCLIPEncoderLayer(nn.Module):
    """``CLIPEncoderLayer`` on ``(B, C, 1, S)``."""

    def __init__(self, layer: CLIPEncoderLayer):
        super().__init__()
        self.layer_norm1 = ChannelLayerNorm(layer.layer_norm1)
        self.self_attn = ConvAttention.from_clip(layer.self_attn)
        self.layer_norm2 = ChannelLayerNorm(layer.layer_norm2)
        self.mlp = layer.mlp  # CLIPMLP.forward is fc1 -> activation -> fc2: swap the two Linears
        self.mlp.fc1 = conv_from_linear(layer.mlp.fc1)
        self.mlp.fc2 = conv_from_linear(layer.mlp.fc2)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), None, bias)
        return x + self.mlp(self.layer_norm2(x))


class ConvCLIPEncoder(nn.Module):
    """Drop-in for ``CLIPEncoder``: one transpose in, one out; the mask is built once."""

    def __init__(self, encoder: CLIPEncoder):
        super().__init__()
        selfs = [l.self_attn for l in encoder.layers if isinstance(l.self_attn, CLIPSelfAttention)]
        self.mask = selfs[0].mask if selfs else AttentionBias()
        self.layers = nn.ModuleList(ConvCLIPEncoderLayer(layer) for layer in encoder.layers)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask=None,
                **kwargs) -> BaseModelOutput:
        bias = self.mask(attention_mask, kwargs.get("is_causal", False), inputs_embeds.shape[1],
                         inputs_embeds)
        x = to_bc1s(inputs_embeds)
        for layer in self.layers:
            x = layer(x, bias)
        return BaseModelOutput(last_hidden_state=to_bsc(x))


# ----------------------------------------------------------------------------- checks

def _check_attention(attn: Attention, name: str) -> None:
    check_plain_attention(attn, name, PASS, _PROCESSORS)
    if attn.norm_cross is not None:
        raise RecipeError(f"{PASS}: attention {where(name)} uses a cross-attention norm, which "
                          f"this pass does not implement; remove {PASS!r} from the recipe")


def _check_transformer(model: Transformer2DModel, name: str) -> None:
    if not model.is_input_continuous:
        raise RecipeError(f"{PASS}: {where(name)} is a patched or vectorized Transformer2DModel; "
                          f"only continuous (B, C, H, W) inputs are supported")
    for i, block in enumerate(model.transformer_blocks):
        here = f"{where(name)}.transformer_blocks.{i}"
        if not isinstance(block, BasicTransformerBlock) or block.norm_type != "layer_norm" or (
                block.pos_embed is not None or hasattr(block, "fuser")):
            raise RecipeError(f"{PASS}: {here} is not a plain layer-norm BasicTransformerBlock "
                              f"(ada norm, positional embedding or gated attention)")
        _check_feed_forward(block.ff, f"{here}.ff")
        for attr in ("attn1", "attn2"):
            if getattr(block, attr) is not None:
                _check_attention(getattr(block, attr), f"{here}.{attr}")


def _check_feed_forward(ff: nn.Module, name: str) -> None:
    act = ff.net[0] if isinstance(ff, FeedForward) else None
    if not isinstance(act, _FF_ACTIVATIONS) or not isinstance(ff.net[2], nn.Linear):
        raise RecipeError(f"{PASS}: {name} is not a FeedForward with one of "
                          f"{', '.join(a.__name__ for a in _FF_ACTIVATIONS)}; got "
                          f"{type(act or ff).__name__}")


def _check_clip_encoder(encoder: CLIPEncoder, name: str) -> None:
    for i, layer in enumerate(encoder.layers):
        ok = (isinstance(layer, CLIPEncoderLayer) and isinstance(layer.mlp, CLIPMLP)
              and isinstance(layer.self_attn, (CLIPAttention, CLIPSelfAttention)))
        if not ok:
            raise RecipeError(f"{PASS}: {where(name)}.layers.{i} is not a standard CLIP encoder "
                              f"layer; this pass cannot rewrite it")


def _outside(module: nn.Module, types: type, containers: list[str]) -> list[tuple[str, nn.Module]]:
    """Submodules of ``types`` that are not inside one of the ``containers`` (module names)."""
    def inside(name: str) -> bool:
        return any(not c or name.startswith(f"{c}.") for c in containers)
    return [(name, mod) for name, mod in find_modules(module, types) if not inside(name)]


# ----------------------------------------------------------------------------- pass

class LinearToConvPass(SurgeryPass):
    """Transformer layers on ``(B, C, 1, S)`` with 1x1 convs (see the module docstring)."""

    name = PASS
    applies_to = frozenset(COMPONENTS)

    def apply(self, module: nn.Module) -> nn.Module:
        transformers = find_modules(module, Transformer2DModel)
        encoders = find_modules(module, CLIPEncoder)
        containers = [name for name, _ in transformers]
        # Spatial attention outside transformers (the VAE mid-block's) is rewritten on its own.
        strays = _outside(module, Attention, containers)
        for name, model in transformers:
            _check_transformer(model, name)
        for name, _ in _outside(module, BasicTransformerBlock, containers):
            raise RecipeError(f"{PASS}: {where(name)} is a transformer block outside a "
                              f"Transformer2DModel; this pass cannot rewrite it")
        for name, attn in strays:
            _check_attention(attn, name)
        for name, encoder in encoders:
            _check_clip_encoder(encoder, name)
        # Strays first: their names are still valid before the containers are replaced.
        module = replace_all(module, strays, ConvAttention.from_diffusers)
        module = replace_all(module, transformers, ConvTransformer2DModel)
        return replace_all(module, encoders, ConvCLIPEncoder)
