"""Export components: a tensor-only module, its named static-shape I/O, and how recorded
pipeline calls map onto its inputs.

Three interfaces:

* ``native`` (ExecuTorch, ONNX): ``input_ids`` int64 [1,77]; UNet ``sample`` [2,4,S,S],
  ``timestep`` [2], ``encoder_hidden_states`` [2,77,D] (``batch2``) or, folded, ``sample``
  [1,4,S,S], ``timestep`` [1], ``cond_embeddings``/``uncond_embeddings`` [1,77,D],
  ``guidance_scale`` [1]; decoder ``z`` [1,4,S,S] -> ``image`` [1,3,8S,8S].
* ``swift`` (Core ML, Apple's StableDiffusion Swift package): ``input_ids`` float32 [1,77]
  (the app passes token ids as floats); UNet ``encoder_hidden_states`` [2,D,1,77] (the app
  transposes the embeddings to the ANE's (B,C,1,S) layout); otherwise as native.
* ``optimum`` (ONNX, Hugging Face optimum's ``ORTStableDiffusionPipeline``): native batch-2
  shapes under optimum's names, UNet ``timestep`` a scalar (see :data:`OPTIMUM_NAMES`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import nn

from mobile_sd.models.text_encoder import TextEncoder
from mobile_sd.names import COMPONENT_NAMES  # noqa: F401  (re-exported)
from mobile_sd.pipeline.recorder import Call

Interface = Literal["native", "swift", "optimum"]
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64,
                 "int32": torch.int32}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    def random(self, gen: torch.Generator) -> torch.Tensor:
        if self.dtype.startswith("int") or self.name == "input_ids":
            return torch.randint(0, 49407, self.shape, generator=gen).to(_TORCH_DTYPES[self.dtype])
        if self.name == "timestep":
            return torch.randint(1, 1000, self.shape, generator=gen).float()
        if self.name == "guidance_scale":
            return torch.full(self.shape, 4.5)
        return torch.randn(self.shape, generator=gen).to(_TORCH_DTYPES[self.dtype])


@dataclass
class ExportComponent:
    """What every exporter needs to know about one component."""
    name: str
    module: nn.Module
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    interface: Interface = "native"
    # Maps one recorded pipeline call to (inputs tuple, expected outputs tuple).
    from_call: Callable[[Call], tuple[tuple, tuple]] = field(repr=False, default=None)
    passes: tuple[str, ...] = ()

    def example_inputs(self, seed: int = 0) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(seed)
        return tuple(spec.random(gen) for spec in self.inputs)

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]


class _SwiftUNetIO(nn.Module):
    """Takes ``encoder_hidden_states`` as (B, D, 1, 77), as Apple's Swift pipeline sends it."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        context = encoder_hidden_states.squeeze(2).transpose(1, 2)
        return self.unet(sample, timestep, context)


def text_encoder_component(clip: nn.Module, max_length: int, hidden: int,
                           interface: Interface) -> ExportComponent:
    dtype = "float32" if interface == "swift" else "int64"
    ids = TensorSpec("input_ids", (1, max_length), dtype)

    def from_call(call: Call):
        return ((call.inputs["input_ids"].to(_TORCH_DTYPES[dtype]),),
                (call.outputs["last_hidden_state"],))
    comp = ExportComponent("text_encoder", TextEncoder(clip), (ids,),
                           (TensorSpec("last_hidden_state", (1, max_length, hidden)),),
                           interface, from_call)
    return optimum_component(comp) if interface == "optimum" else comp


def unet_component(unet: nn.Module, latent: int, channels: int, max_length: int, hidden: int,
                   cfg: Literal["batch2", "folded"], interface: Interface,
                   guidance: float = 4.5) -> ExportComponent:
    """The UNet. ``folded`` expects ``unet`` already wrapped by the ``cfg_fold`` pass."""
    out = (TensorSpec("noise_pred", (2 if cfg == "batch2" else 1, channels, latent, latent)),)
    if cfg == "folded":
        inputs = (TensorSpec("sample", (1, channels, latent, latent)), TensorSpec("timestep", (1,)),
                  TensorSpec("cond_embeddings", (1, max_length, hidden)),
                  TensorSpec("uncond_embeddings", (1, max_length, hidden)),
                  TensorSpec("guidance_scale", (1,)))

        def from_call(call: Call):
            ctx, pred = call.inputs["encoder_hidden_states"], call.outputs["noise_pred"]
            scale = float(call.info.get("guidance", guidance))
            guided = pred[:1] + scale * (pred[1:] - pred[:1])
            return ((call.inputs["sample"][:1], call.inputs["timestep"][:1], ctx[1:], ctx[:1],
                     torch.tensor([scale])), (guided,))
        return ExportComponent("unet", unet, inputs, out, interface, from_call)
    swift = interface == "swift"
    ctx_shape = (2, hidden, 1, max_length) if swift else (2, max_length, hidden)
    inputs = (TensorSpec("sample", (2, channels, latent, latent)), TensorSpec("timestep", (2,)),
              TensorSpec("encoder_hidden_states", ctx_shape))

    def from_call(call: Call):
        ctx = call.inputs["encoder_hidden_states"]
        if swift:
            ctx = ctx.transpose(1, 2).unsqueeze(2)
        return ((call.inputs["sample"], call.inputs["timestep"], ctx), (call.outputs["noise_pred"],))
    comp = ExportComponent("unet", _SwiftUNetIO(unet) if swift else unet, inputs, out,
                           interface, from_call)
    return optimum_component(comp) if interface == "optimum" else comp


def decoder_component(decoder: nn.Module, latent: int, channels: int,
                      interface: Interface, scale: int = 8) -> ExportComponent:
    """The decoder: ``z`` [1,C,S,S] -> ``image`` [1,3,scale*S,scale*S] (``scale``: the VAE's
    2^(blocks-1), as diffusers computes it)."""
    def from_call(call: Call):
        return ((call.inputs["z"],), (call.outputs["image"],))
    comp = ExportComponent("decoder", decoder, (TensorSpec("z", (1, channels, latent, latent)),),
                           (TensorSpec("image", (1, 3, latent * scale, latent * scale)),),
                           interface, from_call)
    return optimum_component(comp) if interface == "optimum" else comp


# --------------------------------------------------------------------------- optimum (ONNX)
# diffusers/optimum's ONNX Stable Diffusion I/O (optimum.onnxruntime.modeling_diffusion feeds
# the sessions by these names): text encoder ``input_ids`` -> ``last_hidden_state``; UNet
# ``sample``, scalar ``timestep``, ``encoder_hidden_states`` -> ``out_sample``; decoder
# ``latent_sample`` -> ``sample``.
OPTIMUM_NAMES = {"text_encoder": (("input_ids",), ("last_hidden_state",)),
                 "unet": (("sample", "timestep", "encoder_hidden_states"), ("out_sample",)),
                 "decoder": (("latent_sample",), ("sample",))}


def _scalar_timestep(unet: nn.Module) -> nn.Module:
    """``unet`` taking one scalar ``timestep`` for the whole batch, as optimum's pipeline sends
    it. Not a wrapper: a shallow twin (same parameters and submodules) whose class overrides
    ``forward``, so the graph keeps the module's own names (the parity locator maps them)."""
    base = type(unet)

    class ScalarTimestepUNet(base):
        def forward(self, sample, timestep, encoder_hidden_states):
            # expanded in the graph: the batch (1, 2 under CFG, more per prompt) is dynamic
            return base.forward(self, sample, timestep.expand(sample.shape[0]),
                                encoder_hidden_states)

    twin = copy.copy(unet)
    twin.__class__ = ScalarTimestepUNet
    return twin


def optimum_component(comp: ExportComponent) -> ExportComponent:
    """``comp`` (batch-2 CFG) with optimum's I/O names and scalar timestep."""
    ins, outs = OPTIMUM_NAMES[comp.name]
    inputs = tuple(TensorSpec(n, s.shape, s.dtype) for n, s in zip(ins, comp.inputs))
    outputs = tuple(TensorSpec(n, s.shape, s.dtype) for n, s in zip(outs, comp.outputs))
    module, from_call = comp.module, comp.from_call
    if comp.name == "unet":
        inputs = (inputs[0], TensorSpec("timestep", ()), inputs[2])
        module = _scalar_timestep(comp.module)

        def from_call(call: Call):   # noqa: F811  (the native mapping, timestep as a scalar)
            (sample, timestep, context), expected = comp.from_call(call)
            return (sample, timestep[0], context), expected
    return ExportComponent(comp.name, module, inputs, outputs, "optimum", from_call, comp.passes)
