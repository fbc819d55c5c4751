"""Tiny graphs for the QNN HTP tests: built, exported to ONNX (dynamo, opset 21) and cached per
test session in one temp folder; calibration samples; PSNR."""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import torch

OPSET = 21
_DIR = Path(tempfile.mkdtemp(prefix="qnn-tests-"))


def workdir() -> Path:
    return _DIR


def psnr(out: np.ndarray, ref: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB, peak = max |ref|."""
    mse = float(np.mean((np.asarray(out, np.float64) - np.asarray(ref, np.float64)) ** 2))
    peak = float(np.abs(ref).max())
    return float("inf") if mse == 0 else 10 * np.log10(peak * peak / mse)


class ConvGnSilu(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.norm = torch.nn.GroupNorm(4, 16)

    def forward(self, x):
        return torch.nn.functional.silu(self.norm(self.conv(x)))


class _UNet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class _Clip(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).last_hidden_state


class _VaeDecoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


def _build(name: str):
    """(module, input names, sample() -> tuple of example tensors) for a tiny component."""
    torch.manual_seed(0)
    if name == "conv_gn_silu":
        return ConvGnSilu().eval(), ["x"], lambda g: (torch.randn(1, 8, 16, 16, generator=g),)
    if name == "unet":
        from diffusers import UNet2DConditionModel
        from diffusers.models.attention_processor import AttnProcessor

        unet = UNet2DConditionModel(
            sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
            attention_head_dim=4, norm_num_groups=4).eval()
        unet.set_attn_processor(AttnProcessor())
        return (_UNet(unet), ["sample", "timestep", "encoder_hidden_states"],
                lambda g: (torch.randn(1, 4, 8, 8, generator=g),
                           torch.rand(1, generator=g) * 999,
                           torch.randn(1, 4, 16, generator=g)))
    if name == "clip":
        from transformers import CLIPTextConfig, CLIPTextModel

        cfg = CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                             num_hidden_layers=2, num_attention_heads=2,
                             max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
                             pad_token_id=1)
        return (_Clip(CLIPTextModel(cfg).eval()), ["input_ids"],
                lambda g: (torch.randint(0, 64, (1, 8), generator=g),))
    if name == "vae_decoder":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
                            layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2).eval()
        return (_VaeDecoder(vae), ["latent"],
                lambda g: (torch.randn(1, 4, 8, 8, generator=g),))
    raise KeyError(name)


@functools.lru_cache(maxsize=None)
def component(name: str):
    """(onnx path, module, input names, sampler) with the ONNX export cached."""
    module, names, sampler = _build(name)
    module.eval()
    path = _DIR / f"{name}.onnx"
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        torch.onnx.export(module, sampler(g), str(path), input_names=names, output_names=["out"],
                          dynamo=True, opset_version=OPSET, verbose=False)
    return path, module, names, sampler


def feeds(name: str, seed: int) -> tuple[dict, np.ndarray]:
    """(ONNX input dict, torch fp32 reference output) for one random input."""
    _, module, names, sampler = component(name)
    inputs = sampler(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = module(*inputs).numpy()
    return {n: t.numpy() for n, t in zip(names, inputs)}, ref


def calibration(name: str, n: int = 8) -> list[dict]:
    return [feeds(name, 1000 + k)[0] for k in range(n)]


@functools.lru_cache(maxsize=None)
def w8a16(name: str) -> Path:
    """The component's w8a16 QDQ model (quantized once per test session)."""
    from mobile_sd.export.qnn.quantize import quantize_w8a16

    path, *_ = component(name)
    out = _DIR / f"{name}_w8a16.onnx"
    quantize_w8a16(path, out, calibration(name))
    return out
