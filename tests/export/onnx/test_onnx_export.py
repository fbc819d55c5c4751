"""ONNX export on tiny components: parity with eager (fp32 tight, fp16 looser), names, files."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from mobile_sd.errors import InvalidArgumentError
from mobile_sd.export.onnx.convert import export_onnx, run_onnx

FP32_ATOL = 1e-4
# fp16 weights and compute (ORT CPU) vs fp32 eager: fp16 has 11 significant bits, so each op
# rounds at ~5e-4 relative; measured 3.3e-3 of the output's max on the tiny UNet (~30 ops deep).
FP16_RTOL_OF_MAX = 1e-2


class UNetSample(nn.Module):
    def __init__(self) -> None:
        from diffusers import UNet2DConditionModel

        super().__init__()
        torch.manual_seed(0)
        self.unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
            attention_head_dim=4, norm_num_groups=8, sample_size=16).eval()

    def forward(self, sample, timestep, context):
        return self.unet(sample, timestep, context).sample


UNET_IN = (torch.randn(1, 4, 16, 16), torch.tensor([500.0]), torch.randn(1, 77, 32))
UNET_NAMES = (["sample", "timestep", "context"], ["noise"])


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.norm = nn.Conv2d(4, 8, 3, padding=1), nn.GroupNorm(2, 8)

    def forward(self, x):
        return self.norm(self.conv(x))


SMALL_IN = (torch.randn(1, 4, 8, 8),)


def _eager(model, inputs) -> np.ndarray:
    with torch.no_grad():
        return model(*inputs).numpy()


@pytest.fixture(scope="module")
def unet():
    return UNetSample().eval()


@pytest.fixture(scope="module")
def unet_fp32(unet, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "unet.onnx"
    return export_onnx(unet, UNET_IN, path, input_names=UNET_NAMES[0], output_names=UNET_NAMES[1])


def test_unet_fp32_matches_eager(unet, unet_fp32):
    import onnx

    proto = onnx.load(unet_fp32.path)
    assert [i.name for i in proto.graph.input] == UNET_NAMES[0]
    assert [o.name for o in proto.graph.output] == UNET_NAMES[1]
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [1, 4, 16, 16]
    assert unet_fp32.simplified and unet_fp32.opset == 20 and unet_fp32.data_path is None
    got = run_onnx(unet_fp32.path, UNET_IN)[0]
    assert np.abs(got - _eager(unet, UNET_IN)).max() <= FP32_ATOL


def test_simplified_nodes_keep_their_module_scopes(unet_fp32):
    """onnxsim drops node metadata; the export puts torch's name scopes back (the parity
    locator names the diverging module from them)."""
    import onnx

    nodes = onnx.load(unet_fp32.path).graph.node
    scoped = [n for n in nodes if any(p.key == "pkg.torch.onnx.name_scopes"
                                      for p in n.metadata_props)]
    # Measured 381 of 425 (without the fix: 0); the rest are nodes onnxsim fuses into new ones
    # (Gemm, Split) under new names and outputs.
    assert len(scoped) >= 0.85 * len(nodes), (len(scoped), len(nodes))
    assert any("up_blocks.1.attentions.0" in p.value for n in scoped for p in n.metadata_props)


def test_unet_fp16_weights_fp32_io(unet, tmp_path):
    import onnx

    result = export_onnx(unet, UNET_IN, tmp_path / "unet16.onnx", input_names=UNET_NAMES[0],
                         output_names=UNET_NAMES[1], fp16=True)
    proto = onnx.load(result.path)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    want = _eager(unet, UNET_IN)
    got = run_onnx(result.path, UNET_IN)[0]
    assert got.dtype == np.float32
    assert np.abs(got - want).max() <= FP16_RTOL_OF_MAX * np.abs(want).max()


def test_text_encoder_int64_ids(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        vocab_size=1000, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
        pad_token_id=1, attn_implementation="eager")).eval()

    class TextEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.clip = clip

        def forward(self, input_ids):
            return self.clip(input_ids=input_ids).last_hidden_state

    ids = (torch.randint(0, 1000, (1, 77)),)
    result = export_onnx(TextEncoder().eval(), ids, tmp_path / "te.onnx",
                         input_names=["input_ids"], output_names=["hidden_states"])
    got = run_onnx(result.path, ids)[0]
    assert np.abs(got - _eager(TextEncoder().eval(), ids)).max() <= FP32_ATOL


def test_external_data_files(tmp_path):
    result = export_onnx(Small(), SMALL_IN, tmp_path / "small.onnx", input_names=["x"],
                         output_names=["y"], external_data=True)
    assert sorted(os.listdir(tmp_path)) == ["small.onnx", "small.onnx.data"]
    assert result.paths == [result.path, result.data_path]
    assert np.abs(run_onnx(result.path, SMALL_IN)[0] - _eager(Small(), SMALL_IN)).max() <= FP32_ATOL


def test_failure_mid_export_leaves_nothing(tmp_path, monkeypatch):
    import mobile_sd.export.onnx.convert as onnx_exporter

    def boom(*_args, **_kwargs):
        raise RuntimeError("converter crashed")

    monkeypatch.setattr(onnx_exporter, "_to_fp16", boom)
    with pytest.raises(RuntimeError, match="converter crashed"):
        export_onnx(Small(), SMALL_IN, tmp_path / "small.onnx", input_names=["x"],
                    output_names=["y"], fp16=True, external_data=True)
    assert os.listdir(tmp_path) == []


def test_bad_arguments(tmp_path):
    with pytest.raises(InvalidArgumentError, match="1 inputs"):
        export_onnx(Small(), SMALL_IN, tmp_path / "a.onnx", input_names=["x", "y"],
                    output_names=["out"])
    with pytest.raises(InvalidArgumentError, match=r"\.onnx"):
        export_onnx(Small(), SMALL_IN, tmp_path / "a.bin", input_names=["x"], output_names=["y"])
    with pytest.raises(InvalidArgumentError, match="takes 1 inputs"):
        result = export_onnx(Small(), SMALL_IN, tmp_path / "b.onnx", input_names=["x"],
                             output_names=["y"])
        run_onnx(result.path, SMALL_IN * 2)
