"""``v_to_epsilon``: the wrapped UNet's output is epsilon (hand formula in float64), DDIM with
v on the raw UNet == DDIM with epsilon on the wrapped one, torch.export and Core ML conversion,
pass-through of epsilon UNets and refusal of ``sample``."""
from __future__ import annotations

import pytest
import torch

from mobile_sd.errors import RecipeError
from mobile_sd.surgery import apply_passes, get_pass
from mobile_sd.surgery.v_to_epsilon import VToEpsilonPass, VToEpsilonUNet, alphas_cumprod


@pytest.fixture(scope="module")
def spec():
    from mobile_sd.models.spec import load_spec

    return load_spec("snapfusion-tiny")


@pytest.fixture(scope="module")
def unet(spec):
    from mobile_sd.models.zoo import build_component

    return build_component(spec, "unet")


def _inputs(seed=0, t=(999.0, 999.0)):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 16, 16, generator=gen), torch.tensor(t),
            torch.randn(2, 77, 32, generator=gen))


def test_snapfusion_specs_are_v_prediction(spec):
    from mobile_sd.models.spec import load_spec

    assert spec.scheduler.prediction_type == "v_prediction"
    assert load_spec("snapfusion").scheduler.prediction_type == "v_prediction"


def test_table_matches_diffusers(spec):
    from diffusers import DDIMScheduler

    ours = alphas_cumprod(spec.scheduler.num_train_timesteps, spec.scheduler.beta_start,
                          spec.scheduler.beta_end, spec.scheduler.beta_schedule)
    theirs = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                           beta_end=0.012).alphas_cumprod.double()
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=0)


@pytest.mark.parametrize("t", [(999.0, 999.0), (0.0, 0.0), (500.0, 500.0), (124.0, 124.0)])
def test_output_is_epsilon_by_hand_float64(unet, spec, t):
    wrapped = get_pass("v_to_epsilon").apply(unet)
    assert isinstance(wrapped, VToEpsilonUNet) and wrapped.unet is unet
    x, ts, ctx = _inputs(1, t)
    with torch.no_grad():
        eps = wrapped(x, ts, ctx).double()
        v = unet(x, ts, ctx).double()
    ab = alphas_cumprod()[int(t[0])]
    expected = ab.sqrt() * v + (1 - ab).sqrt() * x.double()
    rel = (eps - expected).norm() / expected.norm()
    assert rel < 1e-5, rel
    assert (eps - expected).abs().max() < 1e-5 * expected.abs().max()


def test_timestep_shapes_and_int_dtype(unet):
    wrapped = VToEpsilonPass().apply(unet)
    x, ts, ctx = _inputs(2, (250.0, 250.0))
    with torch.no_grad():
        ref = wrapped(x, ts, ctx)
        assert torch.equal(wrapped(x, torch.tensor([250, 250]), ctx), ref)
        assert torch.equal(wrapped(x, torch.tensor(250.0), ctx), ref)
        # float timesteps a hair off an integer (fp16 round trips) look up the same entry
        assert torch.allclose(wrapped(x, torch.tensor([250.0001, 249.9999]), ctx), ref, atol=1e-5)


def test_ddim_v_on_raw_equals_ddim_epsilon_on_wrapped(unet):
    """The property the Swift app relies on: an epsilon sampler on the wrapper follows the
    same trajectory as the v sampler on the UNet (with CFG applied to the outputs)."""
    from diffusers import DDIMScheduler

    wrapped = VToEpsilonPass().apply(unet)
    cfg = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
               clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")
    v_sched = DDIMScheduler(prediction_type="v_prediction", **cfg)
    e_sched = DDIMScheduler(prediction_type="epsilon", **cfg)
    v_sched.set_timesteps(8)
    e_sched.set_timesteps(8)
    assert torch.equal(v_sched.timesteps, e_sched.timesteps)
    gen = torch.Generator().manual_seed(3)
    x_v = x_e = torch.randn(1, 4, 16, 16, generator=gen)
    ctx = torch.randn(2, 77, 32, generator=gen)
    with torch.no_grad():
        for t in v_sched.timesteps:
            ts = torch.full((2,), float(t))
            out_v = unet(torch.cat([x_v, x_v]), ts, ctx)
            out_e = wrapped(torch.cat([x_e, x_e]), ts, ctx)
            g_v = out_v[:1] + 4.5 * (out_v[1:] - out_v[:1])
            g_e = out_e[:1] + 4.5 * (out_e[1:] - out_e[:1])
            x_v = v_sched.step(g_v, t, x_v).prev_sample
            x_e = e_sched.step(g_e, t, x_e).prev_sample
    rel = (x_v - x_e).norm() / x_v.norm()
    assert rel < 1e-4, rel


def test_epsilon_passes_through_and_sample_is_refused(unet):
    assert VToEpsilonPass(prediction_type="epsilon").apply(unet) is unet
    with pytest.raises(RecipeError, match=r"PNDM and DPM-Solver\+\+\) take epsilon only"):
        VToEpsilonPass(prediction_type="sample")
    with pytest.raises(RecipeError, match="prediction_type must be one of epsilon, v_prediction"):
        VToEpsilonPass(prediction_type="flow")
    with pytest.raises(RecipeError, match="beta_schedule"):
        VToEpsilonPass(beta_schedule="squaredcos_cap_v2")
    with pytest.raises(RecipeError, match="once"):
        VToEpsilonPass().apply(VToEpsilonPass().apply(unet))


def test_for_spec_and_registry(spec):
    p = VToEpsilonPass.for_spec(spec)
    assert p.prediction_type == "v_prediction"
    assert VToEpsilonPass.for_spec(spec.scheduler).prediction_type == "v_prediction"
    assert get_pass("v_to_epsilon", prediction_type="epsilon").prediction_type == "epsilon"
    with pytest.raises(RecipeError, match="does not apply to the decoder"):
        apply_passes(torch.nn.Identity(), ["v_to_epsilon"], "decoder")
    with pytest.raises(RecipeError, match="must be the last pass"):
        apply_passes(torch.nn.Identity(), ["v_to_epsilon", "cfg_fold"], "unet")


def test_torch_export_and_coreml_swift_interface(unet):
    """Static-shape torch.export of the Swift-interface UNet (ehs [2,D,1,77], float timestep
    [2]), then coremltools conversion: the table lookup is a one-hot product (no gather,
    whose uint16 index coremltools' bisect_model cannot rebuild when chunking the UNet)."""
    from mobile_sd.export.components import unet_component

    comp = unet_component(VToEpsilonPass().apply(unet), latent=16, channels=4, max_length=77,
                          hidden=32, cfg="batch2", interface="swift")
    x, ts, ctx = _inputs(4, (624.0, 624.0))
    inputs = (x, ts, ctx.transpose(1, 2).unsqueeze(2).contiguous())
    ep = torch.export.export(comp.module, inputs, strict=False)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "aten.eq.Tensor" in targets and "aten.index_select.default" not in targets
    with torch.no_grad():
        assert torch.allclose(ep.module()(*inputs), comp.module(*inputs), atol=1e-6)
    ct = pytest.importorskip("coremltools")
    mlmodel = ct.convert(ep.run_decompositions({}), convert_to="mlprogram",
                         inputs=[ct.TensorType(name=s.name, shape=s.shape) for s in comp.inputs],
                         outputs=[ct.TensorType(name="noise_pred")],
                         minimum_deployment_target=ct.target.iOS17)  # fp16; never predicted here
    ops = [op.op_type for f in mlmodel._mil_program.functions.values() for op in f.operations]
    assert "gather" not in ops and "equal" in ops
    spec = mlmodel.get_spec()
    assert [i.name for i in spec.description.input] == ["sample", "timestep",
                                                         "encoder_hidden_states"]
    assert [o.name for o in spec.description.output] == ["noise_pred"]
