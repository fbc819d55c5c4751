"""Graph surgery passes: fp32 parity, composition, export, Core ML conversion, registry errors.

Every pass claims to preserve numerics, so each is checked against the unmodified module at
``TOL`` (fp32 max abs error) on tiny models whose weights are all re-randomized (diffusers
zero-inits some output layers; a zero layer would let a broken rewrite pass).
"""
from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mobile_sd.errors import RecipeError
from mobile_sd.surgery import (COMPONENTS, PASS_NAMES, ModulePass, apply_passes, get_pass,
                               xnnpack_passes_for)

TOL = 1e-5  # fp32 max abs error allowed for a pass that claims to preserve numerics


# ----------------------------------------------------------------------------- tiny models

def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Seeded non-trivial weights everywhere: N(0, 1/fan_in) weights, norms 1 + N(0, 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in module.modules():
            norm = isinstance(mod, (nn.LayerNorm, nn.GroupNorm))
            for name, p in mod.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=gen)
                if norm and name == "weight":
                    p.copy_(1 + 0.1 * noise)
                elif p.ndim >= 2:
                    p.copy_(noise / math.sqrt(p[0].numel()))
                else:
                    p.copy_(0.1 * noise)
    return module.eval()


def tiny_unet(**overrides) -> nn.Module:
    from diffusers import UNet2DConditionModel

    config = dict(block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                  attention_head_dim=4, norm_num_groups=8, sample_size=16)
    return randomize_(UNet2DConditionModel(**{**config, **overrides}), seed=0)


def tiny_clip(attn_implementation: str) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=37, vocab_size=1000, max_position_embeddings=77,
                            bos_token_id=998, eos_token_id=999, pad_token_id=1)
    return randomize_(CLIPTextModel._from_config(config, attn_implementation=attn_implementation),
                      seed=1)


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def unet_inputs():
    gen = torch.Generator().manual_seed(10)
    return (torch.randn(2, 4, 16, 16, generator=gen), torch.tensor(10.0),
            torch.randn(2, 77, 32, generator=gen))


@pytest.fixture(scope="module")
def efficient_unet():
    """The project's own UNet (snapfusion-tiny topology), made of the same diffusers blocks."""
    from mobile_sd.models.spec import load_spec
    from mobile_sd.models.zoo import build_component

    return randomize_(build_component(load_spec("snapfusion-tiny"), "unet"), seed=3)


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def text_encoder(request):
    return tiny_clip(request.param)


@pytest.fixture(scope="module")
def text_inputs():
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(2, 990, (2, 77), generator=gen)
    ids[0, 9], ids[1, 40] = 999, 999  # EOS, pooled from there
    padding = torch.ones(2, 77, dtype=torch.long)
    padding[1, 50:] = 0
    return ids, padding


@pytest.fixture(scope="module")
def decoder():
    """The project's image decoder: diffusers' VAE ``Decoder`` + ``post_quant_conv``."""
    from mobile_sd.models.spec import load_spec
    from mobile_sd.models.zoo import build_component

    return randomize_(build_component(load_spec("snapfusion-tiny"), "decoder"), seed=2)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def rewritten(module: nn.Module, names: list, component: str) -> nn.Module:
    return apply_passes(copy.deepcopy(module), [_resolve(n) for n in names], component)


def _resolve(item):
    """'split_einsum_v2:100' -> the v2 pass with chunk_size=100."""
    if isinstance(item, str) and ":" in item:
        name, chunk = item.split(":")
        return get_pass(name, chunk_size=int(chunk))
    return item


def _unet_out(unet, inputs):
    with torch.no_grad():
        out = unet(*inputs)
    return out.sample if hasattr(out, "sample") else out


# ----------------------------------------------------------------------------- parity

UNET_LISTS = [
    ["attention_original"], ["split_einsum"], ["split_einsum_v2:100"],  # 256 tokens: 100+100+56
    ["linear_to_conv"], ["linear_to_conv", "split_einsum_v2:100"],
    ["split_einsum", "linear_to_conv"], ["linear_to_conv", "attention_original"],
]


def test_tiny_models_are_not_trivial(unet, unet_inputs):
    """Attention must move the output far beyond TOL, or the parity tests prove nothing."""
    broken = copy.deepcopy(unet)
    for mod in broken.modules():
        if hasattr(mod, "to_out"):
            nn.init.zeros_(mod.to_out[0].weight)
    ref = _unet_out(unet, unet_inputs)
    assert ref.abs().mean() > 0.1
    assert max_err(_unet_out(broken, unet_inputs), ref) > 1e-2


@pytest.mark.parametrize("names", UNET_LISTS, ids="+".join)
def test_unet_parity(unet, unet_inputs, names):
    out = _unet_out(rewritten(unet, names, "unet"), unet_inputs)
    assert max_err(out, _unet_out(unet, unet_inputs)) <= TOL


@pytest.mark.parametrize("names", [["attention_original"],
                                   ["linear_to_conv", "split_einsum_v2:100"]], ids="+".join)
def test_efficient_unet_parity(efficient_unet, unet_inputs, names):
    out = _unet_out(rewritten(efficient_unet, names, "unet"), unet_inputs)
    assert max_err(out, _unet_out(efficient_unet, unet_inputs)) <= TOL


def test_linear_to_conv_linear_projection_and_masks():
    """use_linear_projection=True (proj_in/out are Linear) and a 2-D cross-attention mask."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    from mobile_sd.surgery.linear_to_conv import ConvTransformer2DModel

    model = randomize_(Transformer2DModel(4, 8, in_channels=32, cross_attention_dim=24,
                                          norm_num_groups=8, use_linear_projection=True,
                                          num_layers=2), seed=4)
    gen = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(2, 32, 6, 5, generator=gen), torch.randn(2, 13, 24, generator=gen)
    keep = torch.ones(2, 13)
    keep[0, 7:] = 0
    conv = get_pass("linear_to_conv").apply(copy.deepcopy(model))
    assert isinstance(conv, ConvTransformer2DModel)  # the root itself was replaced
    assert not any(isinstance(m, nn.Linear) for m in conv.modules())
    with torch.no_grad():
        ref = model(x, ctx, encoder_attention_mask=keep).sample
        out = conv(x, ctx, encoder_attention_mask=keep).sample
    assert max_err(out, ref) <= TOL


TEXT_LISTS = [
    ["attention_original"], ["split_einsum"], ["split_einsum_v2:30"],  # 77 = 30+30+17
    ["linear_to_conv"], ["fp16_safe_attention_mask"],
    ["linear_to_conv", "split_einsum", "fp16_safe_attention_mask"],
    ["fp16_safe_attention_mask", "split_einsum_v2:50", "linear_to_conv"],
]


@pytest.mark.parametrize("names", TEXT_LISTS, ids="+".join)
@pytest.mark.parametrize("padded", [False, True], ids=["causal", "causal+padding"])
def test_text_encoder_parity(text_encoder, text_inputs, names, padded):
    ids, padding = text_inputs
    kwargs = {"attention_mask": padding} if padded else {}
    model = rewritten(text_encoder, names, "text_encoder")
    with torch.no_grad():
        ref, out = text_encoder(ids, **kwargs), model(ids, **kwargs)
    assert max_err(out.last_hidden_state, ref.last_hidden_state) <= TOL
    assert max_err(out.pooler_output, ref.pooler_output) <= TOL


DECODER_LISTS = [
    ["attention_original"], ["split_einsum"], ["split_einsum_v2:100"],  # mid-block: 256 tokens
    ["linear_to_conv"], ["linear_to_conv", "split_einsum_v2:100"],
]


@pytest.mark.parametrize("names", DECODER_LISTS, ids="+".join)
def test_decoder_parity(decoder, names):
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        ref, out = decoder(z), rewritten(decoder, names, "decoder")(z)
    assert max_err(out, ref) <= TOL


# ----------------------------------------------------------------------------- split einsum

@pytest.mark.parametrize("seq,chunk", [(77, 30), (256, 100), (576, 512), (1000, 333)])
def test_split_einsum_v2_any_length(seq, chunk):
    """Chunks that do not divide the length; self-attention with a causal bias, cross-attention."""
    from mobile_sd.surgery.attention_original import MatmulAttention
    from mobile_sd.surgery.split_einsum import SplitEinsumAttention

    gen = torch.Generator().manual_seed(seq)
    heads, width = 4, 8
    q = torch.randn(2, heads * width, 1, seq, generator=gen)
    for keys, causal in ((seq, True), (77, False)):
        k, v = (torch.randn(2, heads * width, 1, keys, generator=gen) for _ in range(2))
        bias = torch.full((seq, keys), -1e4).triu(1)[None, None] if causal else None
        out = SplitEinsumAttention(chunk)(q, k, v, heads, width ** -0.5, bias, "bc1s")
        ref = _sdpa_bc1s(q, k, v, heads, bias)
        assert max_err(out, ref) <= TOL
        assert max_err(MatmulAttention()(q, k, v, heads, width ** -0.5, bias, "bc1s"), ref) <= TOL


def _sdpa_bc1s(q, k, v, heads, bias):
    def split(t):  # (B, C, 1, S) -> (B, H, S, d)
        return t.reshape(t.shape[0], heads, -1, t.shape[-1]).transpose(2, 3)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=bias)
    return out.transpose(2, 3).reshape(q.shape[0], -1, 1, q.shape[-1])


class _Kernel(nn.Module):
    def __init__(self, chunk: int):
        super().__init__()
        from mobile_sd.surgery.split_einsum import SplitEinsumAttention
        self.kernel = SplitEinsumAttention(chunk)

    def forward(self, q, k, v):
        return self.kernel(q, k, v, 4, 0.35, None, "bc1s")


@pytest.mark.parametrize("seq,chunk,expected", [(576, 512, [512, 64]), (77, 512, [77]),
                                                (1000, 333, [333, 333, 333, 1])])
def test_split_einsum_v2_bounds_every_attention_map(seq, chunk, expected):
    """In the exported graph, no attention map (einsum 'bchq,bkhc->bkhq', axis 3 = queries)
    is longer than the chunk, and each head's chunks cover the sequence."""
    q = torch.randn(1, 32, 1, seq)
    ep = torch.export.export(_Kernel(chunk), (q, q, q), strict=False)
    lengths = [n.meta["val"].shape[3] for n in ep.graph.nodes
               if n.op == "call_function" and n.args and n.args[0] == "bchq,bkhc->bkhq"]
    assert lengths == expected * 4  # 4 heads


# ----------------------------------------------------------------------------- cfg_fold

def guidance_gain(scale: torch.Tensor) -> float:
    """out = (1 - s) * eps_u + s * eps_c: each branch's error (<= TOL) reaches the output
    scaled by at most |1 - s| + |s|."""
    return float(((1 - scale).abs() + scale.abs()).max())


@pytest.mark.parametrize("scale", [torch.tensor(7.5), torch.tensor([1.0, 4.5])],
                         ids=["scalar", "per-sample"])
@pytest.mark.parametrize("timestep", [torch.tensor(10.0), torch.tensor([10.0, 500.0])],
                         ids=["t-scalar", "t-batch"])
def test_cfg_fold_matches_two_calls(unet, unet_inputs, scale, timestep):
    sample, _, cond = unet_inputs
    uncond = torch.randn(cond.shape, generator=torch.Generator().manual_seed(13))
    folded = rewritten(unet, ["cfg_fold"], "unet")
    with torch.no_grad():
        eps_u = unet(sample, timestep, uncond).sample
        eps_c = unet(sample, timestep, cond).sample
        expected = eps_u + scale.reshape(-1, 1, 1, 1) * (eps_c - eps_u)
        out = folded(sample, timestep, cond, uncond, scale)
    # Batch 2 vs batch 1 takes other fp32 GEMM kernels on some CPUs; guidance amplifies that.
    assert max_err(out, expected) <= TOL * guidance_gain(scale)


def test_cfg_fold_composes_on_efficient_unet(efficient_unet, unet_inputs):
    sample, t, cond = unet_inputs
    uncond, scale = -cond, torch.tensor([4.5])
    folded = rewritten(efficient_unet, ["linear_to_conv", "split_einsum_v2", "cfg_fold"], "unet")
    with torch.no_grad():
        eps_u, eps_c = efficient_unet(sample, t, uncond), efficient_unet(sample, t, cond)
        out = folded(sample, t, cond, uncond, scale)
    assert max_err(out, eps_u + scale * (eps_c - eps_u)) <= TOL * guidance_gain(scale)


# ----------------------------------------------------------------------------- fp16 mask

def test_fp16_safe_mask_survives_fp16_cast(text_inputs):
    """An fp16 backend casts the fp32-traced mask (finfo.min) to fp16: -inf. Left padding then
    masks whole rows: softmax of all -inf is NaN, of all -1e4 is finite."""
    ids, _ = text_inputs
    model = tiny_clip("eager")
    mask = torch.full((77, 77), torch.finfo(torch.float32).min).triu(1)
    mask[:, :3] = torch.finfo(torch.float32).min  # three left-padding tokens
    mask = mask[None, None].expand(2, 1, 77, 77)
    fixed = rewritten(model, ["fp16_safe_attention_mask"], "text_encoder")
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).last_hidden_state
        broken = model.half()(ids, attention_mask=mask.half()).last_hidden_state
        out = fixed.half()(ids, attention_mask=mask.half()).last_hidden_state
    assert torch.isnan(broken).any()
    assert torch.isfinite(out).all()
    assert max_err(out[:, 3:].float(), ref[:, 3:]) < 2e-2  # fp16 precision on kept rows


# ----------------------------------------------------------------------------- export

def _call_targets(ep) -> set[str]:
    return {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}


# The Core ML tests below export the ANE lists (linear_to_conv, split_einsum_v2, cfg_fold).
@pytest.mark.parametrize("names", [["attention_original", "cfg_fold"], ["split_einsum"]],
                         ids="+".join)
def test_unet_exports(unet, unet_inputs, names):
    model = rewritten(unet, names, "unet")
    sample, t, cond = unet_inputs
    inputs = (sample, t, cond, -cond, torch.tensor([7.5])) if "cfg_fold" in names else unet_inputs
    ep = torch.export.export(model, inputs, strict=False)
    ops = _call_targets(ep)
    assert "aten.scaled_dot_product_attention.default" not in ops
    assert ("aten.einsum.default" in ops) == ("split_einsum" in names)
    assert max_err(_unet_out(ep.module(), inputs), _unet_out(model, inputs)) <= TOL


@pytest.mark.parametrize("names", TEXT_LISTS[:5], ids="+".join)
def test_text_encoder_exports(text_inputs, names):
    ids, _ = text_inputs
    model = TextOnly(rewritten(tiny_clip("sdpa"), names, "text_encoder"))
    ep = torch.export.export(model, (ids,), strict=False)
    assert "aten.scaled_dot_product_attention.default" not in _call_targets(ep)
    assert max_err(ep.module()(ids), model(ids)) <= TOL


@pytest.mark.parametrize("names", DECODER_LISTS[:2], ids="+".join)
def test_decoder_exports(decoder, names):
    z = torch.randn(1, 4, 16, 16)
    ep = torch.export.export(rewritten(decoder, names, "decoder"), (z,), strict=False)
    assert "aten.scaled_dot_product_attention.default" not in _call_targets(ep)


class TextOnly(nn.Module):
    """``ids -> last_hidden_state``; position ids built here, not sliced from CLIP's buffer (a
    full-length slice exports as ``aten.alias``, which coremltools cannot convert)."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        return self.clip(ids, position_ids=positions).last_hidden_state


# ----------------------------------------------------------------------------- Core ML

def _coreml(model: nn.Module, inputs: tuple):
    """Export, check the exported program against eager, convert (fp16); return the MIL ops."""
    ct = pytest.importorskip("coremltools")
    ep = torch.export.export(model, inputs, strict=False)
    assert "aten.scaled_dot_product_attention.default" not in _call_targets(ep)
    with torch.no_grad():
        assert max_err(_unet_out(ep.module(), inputs), _unet_out(model, inputs)) <= TOL
    mlmodel = ct.convert(ep.run_decompositions({}), convert_to="mlprogram",
                         minimum_deployment_target=ct.target.iOS17)  # fp16; never predict
    return [op for f in mlmodel._mil_program.functions.values() for op in f.operations]


def _op_count(ops, op_type: str) -> int:
    return sum(op.op_type == op_type for op in ops)


def test_coreml_converts_ane_unet(unet, unet_inputs):
    from mobile_sd.surgery.linear_to_conv import ChannelLayerNorm

    model = rewritten(unet, ["linear_to_conv", "split_einsum_v2", "cfg_fold"], "unet")
    sample, t, cond = unet_inputs
    ops = _coreml(model, (sample[:1], t.reshape(1), cond[:1], -cond[:1], torch.tensor([7.5])))
    assert _op_count(ops, "einsum") > 0
    # Transformer linears are convs now; the timestep MLP's are all that is left.
    assert _op_count(ops, "linear") == sum(isinstance(m, nn.Linear) for m in model.modules())
    # coremltools fuses ChannelLayerNorm into layer_norm (one op, no fp16 squares).
    norms = sum(isinstance(m, ChannelLayerNorm) for m in model.modules())
    assert _op_count(ops, "layer_norm") == norms


@pytest.mark.parametrize("names,finite", [
    (["attention_original"], False),  # the problem: finfo.min, cast to fp16, is -inf
    (["attention_original", "fp16_safe_attention_mask"], True),
    (["linear_to_conv", "split_einsum", "fp16_safe_attention_mask"], True),
], ids=["attention_original", "attention_original+fp16_mask",
        "linear_to_conv+split_einsum+fp16_mask"])
def test_coreml_text_encoder_fp16_constants(text_inputs, names, finite):
    """Core ML stores the (constant-folded) causal mask as an fp16 const: finite only with
    fp16_safe_attention_mask."""
    import numpy as np

    model = TextOnly(rewritten(tiny_clip("sdpa"), names, "text_encoder"))
    ops = _coreml(model, (text_inputs[0][:1],))
    consts = [np.asarray(op.outputs[0].val) for op in ops if op.op_type == "const"]
    assert all(np.isfinite(c).all() for c in consts if c.dtype.kind == "f") == finite
    if "linear_to_conv" in names:
        assert _op_count(ops, "conv") == 12 and _op_count(ops, "linear") == 0  # 2 layers x 6


def test_coreml_converts_ane_decoder(decoder):
    ops = _coreml(rewritten(decoder, ["linear_to_conv", "split_einsum_v2"], "decoder"),
                  (torch.randn(1, 4, 16, 16),))
    assert _op_count(ops, "einsum") == 2 and _op_count(ops, "linear") == 0


# ----------------------------------------------------------------------------- registry

def test_registry_lists_every_pass_with_its_flags():
    for name in PASS_NAMES:
        surgery = get_pass(name)
        assert surgery.name == name
        assert surgery.applies_to and surgery.applies_to <= set(COMPONENTS)
        doc = surgery.__doc__ if isinstance(surgery, ModulePass) else (
            sys.modules[type(surgery).__module__].__doc__)
        assert "Before" in doc  # every pass shows its before/after structure


@pytest.mark.parametrize("component", COMPONENTS)
def test_xnnpack_list_composes(component, unet, unet_inputs, text_encoder, text_inputs, decoder):
    """The ExecuTorch/XNNPACK list: attention_original then the module-style xnnpack_* passes."""
    names = ["attention_original", *xnnpack_passes_for(component)]
    assert len(names) > 1
    if component == "unet":
        out, ref = _unet_out(rewritten(unet, names, "unet"), unet_inputs), _unet_out(unet, unet_inputs)
    elif component == "text_encoder":
        with torch.no_grad():
            out = rewritten(text_encoder, names, component)(text_inputs[0]).last_hidden_state
            ref = text_encoder(text_inputs[0]).last_hidden_state
    else:
        z = torch.randn(1, 4, 16, 16)
        with torch.no_grad():
            out, ref = rewritten(decoder, names, component)(z), decoder(z)
    assert max_err(out, ref) <= TOL


def test_get_pass_unknown_name_lists_valid_names():
    with pytest.raises(RecipeError, match=r"unknown surgery pass 'split_einsum_v3'; valid names: "
                                          r"attention_original, split_einsum, split_einsum_v2"):
        get_pass("split_einsum_v3")


def test_get_pass_rejects_unknown_option():
    with pytest.raises(RecipeError, match="surgery pass 'linear_to_conv' does not take options "
                                          "chunk_size"):
        get_pass("linear_to_conv", chunk_size=4)


@pytest.mark.parametrize("chunk", [0, -1, 2.5, None, True])
def test_split_einsum_v2_chunk_size_validated(chunk):
    with pytest.raises(RecipeError, match="split_einsum_v2: chunk_size must be a positive integer"):
        get_pass("split_einsum_v2", chunk_size=chunk)


def test_fp16_mask_value_validated():
    with pytest.raises(RecipeError, match=r"mask_value must be a number in \[-65504, -1000\]"):
        get_pass("fp16_safe_attention_mask", mask_value=-1e5)


def test_apply_passes_rejects_a_pass_for_another_component(unet):
    with pytest.raises(RecipeError, match="surgery pass 'fp16_safe_attention_mask' does not apply "
                                          "to the unet; it applies to: text_encoder"):
        apply_passes(unet, ["fp16_safe_attention_mask"], "unet")
    with pytest.raises(RecipeError, match="'cfg_fold' does not apply to the decoder"):
        apply_passes(unet, ["cfg_fold"], "decoder")


def test_apply_passes_rejects_unknown_component(unet):
    with pytest.raises(RecipeError, match="unknown component 'vae'; valid components: "
                                          "text_encoder, unet, decoder"):
        apply_passes(unet, ["attention_original"], "vae")


def test_apply_passes_checks_the_list_before_running_anything(unet):
    model = copy.deepcopy(unet)
    with pytest.raises(RecipeError, match="'cfg_fold' wraps the module and changes its inputs, "
                                          "so it must be the last pass"):
        apply_passes(model, ["split_einsum", "cfg_fold", "linear_to_conv"], "unet")
    with pytest.raises(RecipeError, match="'attention_original', 'split_einsum_v2' each choose "
                                          "the attention kernel; list at most one"):
        apply_passes(model, ["attention_original", "split_einsum_v2"], "unet")
    with pytest.raises(RecipeError, match="'linear_to_conv' listed more than once"):
        apply_passes(model, ["linear_to_conv", "linear_to_conv"], "unet")
    assert type(model.down_blocks[0].attentions[0]).__name__ == "Transformer2DModel"


def test_unsupported_attention_is_named_and_left_untouched():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    model = nn.Sequential(Attention(32, heads=4, dim_head=8),
                          Attention(32, heads=4, dim_head=8, qk_norm="layer_norm"))
    for name in ("attention_original", "split_einsum", "linear_to_conv"):
        with pytest.raises(RecipeError, match=f"{name}: attention 1 uses qk_norm"):
            get_pass(name).apply(model)
        assert isinstance(model[0].processor, AttnProcessor2_0)


def test_adapter_processors_are_rejected():
    from diffusers.models.attention_processor import Attention

    class AdapterProcessor:
        def __call__(self, attn, hidden_states, **kwargs):
            return hidden_states

    attn = Attention(32, heads=4, dim_head=8, processor=AdapterProcessor())
    with pytest.raises(RecipeError, match="uses processor AdapterProcessor .*fuse or unload "
                                          "adapters before surgery"):
        get_pass("split_einsum").apply(attn)


def test_linear_to_conv_rejects_ada_norm_blocks():
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    model = nn.Sequential(Transformer2DModel(2, 8, in_channels=16, norm_num_groups=8,
                                             num_embeds_ada_norm=10, norm_type="ada_norm"))
    with pytest.raises(RecipeError, match=r"linear_to_conv: 0.transformer_blocks.0 is not a plain "
                                          r"layer-norm BasicTransformerBlock"):
        get_pass("linear_to_conv").apply(model)
    assert isinstance(model[0], Transformer2DModel)


def test_cfg_fold_twice_is_rejected(unet):
    folded = get_pass("cfg_fold").apply(unet)
    assert folded.unet is unet  # wraps, does not copy
    with pytest.raises(RecipeError, match="already folded"):
        get_pass("cfg_fold").apply(folded)
