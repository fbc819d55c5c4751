"""Numerics of the XNNPACK surgery passes: each rewrite matches the original within 1e-5."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mobile_sd.surgery import (xnnpack_attention, xnnpack_conv_split, xnnpack_geglu,
                               xnnpack_group_norm, xnnpack_layer_norm, xnnpack_passes_for,
                               xnnpack_upsample)
from tests.helpers.tiny_models import diffusers_tiny_unet

PASSES = (xnnpack_group_norm, xnnpack_layer_norm, xnnpack_upsample, xnnpack_geglu,
          xnnpack_attention, xnnpack_conv_split)
ATOL = 1e-5  # fp32 re-association of mean/variance; the rewrites are exact in exact arithmetic


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights everywhere (norms start as ones/zeros, which would hide errors)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
    return module


def _max_err(original: nn.Module, pass_module, *inputs) -> tuple[float, int]:
    rewritten = copy.deepcopy(original)
    count = pass_module.apply(rewritten)
    with torch.no_grad():
        err = (rewritten(*inputs) - original(*inputs)).abs().max().item()
    return err, count


@pytest.mark.parametrize("shape", [(2, 32, 9, 7), (1, 32, 50)])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_matches(shape, affine):
    norm = _randomize(nn.GroupNorm(8, 32, eps=1e-6, affine=affine))
    x = torch.randn(shape) * 3 + 2  # offset mean: a one-pass variance would lose digits here
    err, count = _max_err(norm, xnnpack_group_norm, x)
    assert count == 1 and err <= ATOL


@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_layer_norm_matches(affine, bias):
    norm = _randomize(nn.LayerNorm(32, elementwise_affine=affine, bias=bias))
    err, count = _max_err(norm, xnnpack_layer_norm, torch.randn(2, 77, 32) * 3 + 2)
    assert count == 1 and err <= ATOL


def _exported_ops(module: nn.Module, *inputs) -> list[str]:
    graph = torch.export.export(module, inputs).graph
    return [str(n.target) for n in graph.nodes if n.op == "call_function"]


def test_group_norm_4d_output_is_not_reshaped():
    # A same-shape view_copy at the end made XNNPACK move the whole tensor NHWC -> NCHW and
    # back before the next conv (measured: 1.2 ms per norm at 320x64x64 int8).
    norm = nn.GroupNorm(8, 32)
    xnnpack_group_norm.apply(norm)
    graph = torch.export.export(norm, (torch.randn(2, 32, 9, 7),)).graph
    (result,) = [n for n in graph.nodes if n.op == "output"][0].args[0]
    assert "view" not in str(result.target) and "add" in str(result.target)


def test_layer_norm_statistics_are_linears_not_means():
    # mean.dim is NHWC-only in XNNPACK: the (rows, 1, K, 1) form cost layout transposes and a
    # slow strided reduction; two 1-output linears give the same statistics.
    norm = nn.LayerNorm(32)
    xnnpack_layer_norm.apply(norm)
    ops = _exported_ops(norm, torch.randn(2, 77, 32))
    assert ops.count("aten.linear.default") == 2
    assert not any("mean" in op for op in ops)


def _attention(cross: bool):
    from diffusers.models.attention_processor import Attention, AttnProcessor

    attn = _randomize(Attention(32, cross_attention_dim=24 if cross else None, heads=4,
                                dim_head=8, bias=True)).eval()
    attn.set_processor(AttnProcessor())
    return attn


@pytest.mark.parametrize("cross", [False, True])
def test_attention_scale_fold_matches(cross):
    attn = _attention(cross)
    x, context = torch.randn(2, 20, 32), torch.randn(2, 7, 24) if cross else None
    rewritten = copy.deepcopy(attn)
    assert xnnpack_attention.apply(rewritten) == 1 and rewritten.scale == 1.0
    with torch.no_grad():
        want = attn(x, context)
        err = (rewritten(x, context) - want).abs().max().item()
    # One rounding of scale * weight, relative to the output's scale (randomized weights).
    assert err <= ATOL * max(1.0, want.abs().max().item())
    # The score multiply and the divide by rescale_output_factor (1.0) are gone.
    ops = _exported_ops(rewritten, x, context) if cross else _exported_ops(rewritten, x)
    assert not any(op.startswith(("aten.mul", "aten.div", "aten.baddbmm")) for op in ops)
    assert xnnpack_attention.apply(rewritten) == 0


def test_attention_scale_fold_skips_sdpa_and_folds_clip():
    from diffusers.models.attention_processor import AttnProcessor2_0

    from mobile_sd.surgery.attention_original import CLIPSelfAttention, MatmulAttention

    attn = _attention(False)
    attn.set_processor(AttnProcessor2_0())  # SDPA ignores attn.scale: folding would be wrong
    assert xnnpack_attention.apply(attn) == 0 and attn.scale != 1.0
    projections = [_randomize(nn.Linear(32, 32), seed=i) for i in range(4)]
    clip = CLIPSelfAttention(*projections, heads=4, scale=8 ** -0.5, kernel=MatmulAttention())
    x = torch.randn(1, 9, 32)
    rewritten = copy.deepcopy(clip)
    assert xnnpack_attention.apply(rewritten) == 1
    with torch.no_grad():
        want = clip(x)[0]
        assert (rewritten(x)[0] - want).abs().max().item() <= ATOL * max(1.0, want.abs().max())


@pytest.mark.parametrize("in_channels,chunks", [(700, 2), (1280, 2), (1300, 3), (640, 0)])
def test_conv_split_matches(in_channels, chunks):
    conv = _randomize(nn.Conv2d(in_channels, 16, 3, padding=1))
    x = torch.randn(2, in_channels, 6, 5)
    err, count = _max_err(conv, xnnpack_conv_split, x)
    assert count == (1 if chunks else 0) and err <= ATOL * max(1.0, conv(x).abs().max().item())
    rewritten = copy.deepcopy(conv)
    xnnpack_conv_split.apply(rewritten)
    assert rewritten.state_dict().keys() == conv.state_dict().keys()
    assert len([name for name, _ in rewritten.named_buffers() if "_chunk_weight" in name]) == chunks


def test_conv_split_only_for_float_convs():
    assert "xnnpack_conv_split" in xnnpack_passes_for("unet", "fp32")
    assert "xnnpack_conv_split" in xnnpack_passes_for("decoder", "int8_dynamic")
    assert "xnnpack_conv_split" not in xnnpack_passes_for("unet", "int8")
    assert "xnnpack_conv_split" in xnnpack_passes_for("unet")  # no precision: every pass


@pytest.mark.parametrize("use_conv", [True, False])
def test_upsample_matches(use_conv):
    from diffusers.models.upsampling import Upsample2D

    up = _randomize(Upsample2D(16, use_conv=use_conv)).eval()
    x = torch.randn(2, 16, 5, 6, generator=torch.Generator().manual_seed(0))
    err, count = _max_err(up, xnnpack_upsample, x)
    with torch.no_grad():
        scale = max(1.0, up(x).abs().max().item())
    # Phase kernels sum weights before multiplying: rounding relative to the output's scale.
    assert count == 1 and err <= ATOL * scale
    rewritten = copy.deepcopy(up)
    xnnpack_upsample.apply(rewritten)
    # An explicit non-2x output size falls back to diffusers' own interpolate.
    assert torch.equal(rewritten(x, output_size=(11, 12)), up(x, output_size=(11, 12)))
    assert rewritten.state_dict().keys() == up.state_dict().keys()


@pytest.mark.parametrize("kernel_size,padding,by_phases", [(3, 1, True), (5, 2, False)])
def test_upsample_conv_phases_or_depthwise(kernel_size, padding, by_phases):
    from diffusers.models.upsampling import Upsample2D

    up = _randomize(Upsample2D(8, use_conv=True, out_channels=12, kernel_size=kernel_size,
                               padding=padding)).eval()
    x = torch.randn(2, 8, 5, 6) * 2
    rewritten = copy.deepcopy(up)
    assert len(xnnpack_upsample.foldable_convs(rewritten)) == int(by_phases)
    assert xnnpack_upsample.apply(rewritten) == 1
    # 3x3 / pad 1 becomes one 2x2 conv with a channel block per output phase, on the small
    # input; anything else keeps the conv after a depthwise nearest kernel.
    assert isinstance(rewritten.conv, xnnpack_upsample._PhaseUpsampleConv) is by_phases
    with torch.no_grad():
        got, want = rewritten(x), up(x)
    assert got.shape == want.shape == (2, 12, 10, 12)
    assert (got - want).abs().max().item() <= ATOL * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("bias", [True, False])
def test_phase_convs_are_upsample_then_conv(bias):
    import torch.nn.functional as F

    weight = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64) if bias else None
    x = torch.randn(1, 4, 3, 5, dtype=torch.float64)
    want = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, b, padding=1)
    kernel = xnnpack_upsample.phase_kernel(weight)
    assert kernel.shape == (4 * 6, 4, 2, 2)
    got = xnnpack_upsample.upsample_conv_by_phases(x, kernel, None if b is None else b.repeat(4))
    assert torch.allclose(got, want, atol=1e-12)


def test_geglu_matches():
    from diffusers.models.activations import GEGLU

    geglu = _randomize(GEGLU(32, 48))
    err, count = _max_err(geglu, xnnpack_geglu, torch.randn(2, 77, 32))
    assert count == 1 and err <= ATOL


def test_passes_on_tiny_unet_preserve_numerics_and_state_dict():
    unet = _randomize(diffusers_tiny_unet(), seed=1)
    rewritten = copy.deepcopy(unet)
    counts = {p.__name__.rsplit(".", 1)[-1]: p.apply(rewritten) for p in PASSES}
    assert counts == {"xnnpack_group_norm": 21, "xnnpack_layer_norm": 12,
                      "xnnpack_upsample": 1, "xnnpack_geglu": 4, "xnnpack_attention": 8,
                      "xnnpack_conv_split": 0}  # the tiny UNet's convs are all <= 640 wide
    inputs = (torch.randn(1, 4, 16, 16), torch.tensor([500.0]), torch.randn(1, 77, 32))
    with torch.no_grad():
        want, got = unet(*inputs).sample, rewritten(*inputs).sample
    # Relative to the output scale: 21 norms deep, with randomized (large) weights.
    assert (got - want).abs().max().item() <= ATOL * max(1.0, want.abs().max().item())
    assert rewritten.state_dict().keys() == unet.state_dict().keys()
    assert all(p.apply(rewritten) == 0 for p in PASSES)  # idempotent


def test_pass_flags():
    for p in PASSES:
        assert isinstance(p.applies_to, tuple) and p.applies_to
        assert p.__doc__ and "Before" in p.__doc__ and "After" in p.__doc__
