"""Hostile model folders and spec/recipe files: one-line errors of mobile-sd's own types that name
the file at fault, never a traceback from json/yaml/torch/diffusers.

Table-driven: a new case is one row of ``CASES`` -- (name, corrupt, error type, message
substring[, loader]). ``corrupt(folder)`` damages a fresh copy of the sd15-tiny folder and returns
the path (relative to the folder) the message must name; ``loader(path)`` reads the result
(default: ``load_model_folder`` of the folder).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
import torch
from safetensors.torch import load_file, save_file

from mobile_sd.config import load_yaml
from mobile_sd.errors import (ModelFolderError, RecipeError, SpecError, TensorMismatchError,
                              WeightsError)
from mobile_sd.models.folder import load_model_folder
from mobile_sd.models.spec import load_spec

UNET_CFG, VAE_CFG, TEXT_CFG = "unet/config.json", "vae/config.json", "text_encoder/config.json"
SCHED_CFG = "scheduler/scheduler_config.json"
UNET_W = "unet/diffusion_pytorch_model.safetensors"
INDEX = UNET_W + ".index.json"
DEEP_JSON = "[" * 100_000 + "]" * 100_000
DEEP_YAML = "unet: " + "[" * 100_000 + "]" * 100_000 + "\n"


# ---- ways to corrupt a folder; each returns the relative path the error must name ----------

def raw(rel: str, data: str | bytes) -> Callable[[Path], str]:
    def corrupt(folder: Path) -> str:
        path = folder / rel
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return rel
    return corrupt


def edit(rel: str, **changes) -> Callable[[Path], str]:
    """Set (value) or delete (``...``) keys of a JSON config."""
    def corrupt(folder: Path) -> str:
        path = folder / rel
        config = json.loads(path.read_text())
        for key, value in changes.items():
            if value is ...:
                config.pop(key)
            else:
                config[key] = value
        path.write_text(json.dumps(config))
        return rel
    return corrupt


def sharded(weight_map=None, index=None, drop_shard=False) -> Callable[[Path], str]:
    """Split the UNet weights into two shards with an index; ``weight_map(real_map)`` /
    ``index(real_index)`` replace what gets written; ``drop_shard`` deletes the second shard."""
    def corrupt(folder: Path) -> str:
        unet = folder / "unet"
        tensors = load_file(str(folder / UNET_W))
        names = sorted(tensors)
        shards = {f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors": names[i::2]
                  for i in range(2)}
        for shard, keys in shards.items():
            save_file({k: tensors[k] for k in keys}, str(unet / shard))
        (folder / UNET_W).unlink()
        real = {k: s for s, keys in shards.items() for k in keys}
        data = {"metadata": {}, "weight_map": weight_map(real) if weight_map else real}
        data = index(data) if index else data
        if not isinstance(data, (str, bytes)):
            data = json.dumps(data)
        (folder / INDEX).write_bytes(data if isinstance(data, bytes) else data.encode())
        if drop_shard:
            (unet / list(shards)[1]).unlink()
            return f"unet/{list(shards)[1]}"
        return INDEX
    return corrupt


def retype(rel: str, name: str, dtype: torch.dtype) -> Callable[[Path], str]:
    def corrupt(folder: Path) -> str:
        tensors = load_file(str(folder / rel))
        tensors[name] = tensors[name].to(dtype)
        save_file(tensors, str(folder / rel))
        return rel
    return corrupt


def yaml_file(text: str | bytes, name: str = "spec.yaml") -> Callable[[Path], str]:
    return raw(name, text)


def as_spec(folder: Path, rel: str):
    return load_spec(str(folder / rel))


def as_recipe(folder: Path, rel: str):
    return load_yaml(folder / rel, RecipeError)


def as_folder(folder: Path, rel: str):
    return load_model_folder(folder)


class Case(NamedTuple):
    name: str
    corrupt: Callable[[Path], str]
    error: type[Exception]
    message: str
    load: Callable = as_folder


SPEC_YAML = (Path(__import__("mobile_sd").__path__[0]) / "specs" / "sd15-tiny.yaml").read_text()

CASES = [
    # configs that are not JSON objects / not UTF-8 / not JSON
    Case("unet config is a list", raw(UNET_CFG, "[]"), ModelFolderError,
         "expected a JSON object, got list"),
    Case("text config is a string", raw(TEXT_CFG, '"clip"'), ModelFolderError,
         "expected a JSON object, got str"),
    Case("model_index is null", raw("model_index.json", "null"), ModelFolderError,
         "expected a JSON object, got NoneType"),
    Case("scheduler config is a list", raw(SCHED_CFG, "[1]"), ModelFolderError,
         "expected a JSON object"),
    Case("unet config not UTF-8", raw(UNET_CFG, b'{"_class_name": "\xff\xfe"}'),
         ModelFolderError, "not UTF-8 text (byte 0xff"),
    Case("vae config not UTF-8", raw(VAE_CFG, b"\x80" * 8), ModelFolderError, "not UTF-8"),
    Case("unet config truncated", raw(UNET_CFG, '{"_class_name": "UNet2D'), ModelFolderError,
         "invalid JSON"),
    Case("unet config nested 100k deep", raw(UNET_CFG, DEEP_JSON), ModelFolderError,
         "nested too deeply"),
    # zero / negative / inconsistent sizes
    Case("unet norm_num_groups 0", edit(UNET_CFG, norm_num_groups=0), SpecError,
         "norm_num_groups must be > 0, got 0"),
    Case("unet channels not divisible by groups", edit(UNET_CFG, norm_num_groups=5), SpecError,
         "channels 16 not divisible by norm_num_groups 5"),
    Case("unet negative channels", edit(UNET_CFG, block_out_channels=[16, -32, 32, 32]),
         SpecError, "need channels > 0"),
    Case("unet layers_per_block 0", edit(UNET_CFG, layers_per_block=0), SpecError,
         "resnets >= 1"),
    Case("unet attention heads 0", edit(UNET_CFG, attention_head_dim=0), SpecError,
         "attention_heads must be > 0"),
    Case("unet heads do not divide channels", edit(UNET_CFG, attention_head_dim=3), SpecError,
         "not divisible by attention_heads 3"),
    Case("unet cross_attention_dim 0", edit(UNET_CFG, cross_attention_dim=0), SpecError,
         "cross_attention_dim must be > 0"),
    Case("unet channels not a list", edit(UNET_CFG, block_out_channels="wide"), SpecError,
         "block_out_channels must be a non-empty list"),
    Case("unet channels of strings", edit(UNET_CFG, block_out_channels=["a", "b", "c", "d"]),
         SpecError, "expected int, got str"),
    Case("unet layers list of wrong length", edit(UNET_CFG, layers_per_block=[1, 2]), SpecError,
         "layers_per_block has 2 entries for 4 blocks"),
    Case("unet block type counts differ", edit(UNET_CFG, down_block_types=["DownBlock2D"] * 3),
         SpecError, "3 down_block_types and 4 up_block_types for 4 block_out_channels"),
    Case("unet sample_size odd", edit(UNET_CFG, sample_size=15), SpecError,
         "sample_size 15 must be divisible by 2^3"),
    Case("unet block types not a list", edit(UNET_CFG, up_block_types={"a": 1}), SpecError,
         "up_block_types must be a list of block type names"),
    Case("unet unsupported mid block", edit(UNET_CFG, mid_block_type="UNetMidBlock2DSimpleCrossAttn"),
         SpecError, "unsupported diffusers block types mid_block_type='UNetMidBlock2DSimpleCrossAttn'"),
    Case("unet mid block type unhashable", edit(UNET_CFG, mid_block_type=["x"]), SpecError,
         "unsupported diffusers block types"),
    Case("unet upcast_attention", edit(UNET_CFG, upcast_attention=True), SpecError,
         "upcast_attention=True is not supported"),
    Case("unet per-block heads", edit(UNET_CFG, attention_head_dim=[2, 4, 4, 4]), SpecError,
         "per-block attention_head_dim [2, 4, 4, 4] is not supported"),
    Case("unet unknown class", edit(UNET_CFG, _class_name="UNet3D"), SpecError,
         "_class_name 'UNet3D' is not a UNet"),
    Case("vae norm_num_groups 0", edit(VAE_CFG, norm_num_groups=0), SpecError,
         "norm_num_groups must be > 0, got 0"),
    Case("vae no blocks", edit(VAE_CFG, block_out_channels=[]), SpecError,
         "block_out_channels must not be empty"),
    Case("vae channels not divisible by groups", edit(VAE_CFG, norm_num_groups=3), SpecError,
         "block_out_channels 8 not divisible by norm_num_groups 3"),
    Case("vae missing channels", edit(VAE_CFG, block_out_channels=...), SpecError,
         "missing required key 'block_out_channels'"),
    Case("text heads 0", edit(TEXT_CFG, num_attention_heads=0), SpecError,
         "num_attention_heads must be > 0, got 0"),
    Case("text hidden not divisible by heads", edit(TEXT_CFG, hidden_size=30), SpecError,
         "hidden_size 30 not divisible by num_attention_heads 4"),
    Case("text missing hidden_size", edit(TEXT_CFG, hidden_size=...), SpecError,
         "missing required key(s) 'hidden_size'"),
    Case("text hidden_act unknown", edit(TEXT_CFG, hidden_act="swish"), SpecError,
         "invalid value 'swish'"),
    Case("scheduler zero timesteps", edit(SCHED_CFG, num_train_timesteps=0), SpecError,
         "num_train_timesteps must be > 0"),
    Case("tokenizer config is a list", raw("tokenizer/tokenizer_config.json", "[]"),
         ModelFolderError, "expected a JSON object, got list"),
    Case("tokenizer vocab not UTF-8", raw("tokenizer/vocab.json", b'{"\xff": 0}'),
         ModelFolderError, "not UTF-8"),
    Case("tokenizer merges not UTF-8", raw("tokenizer/merges.txt", b"\xff\n"), ModelFolderError,
         "not UTF-8"),
    Case("tokenizer vocab is a list", raw("tokenizer/vocab.json", "[1, 2]"), ModelFolderError,
         "expected a JSON object"),
    # weights and their indexes
    Case("index weight_map is a list", sharded(weight_map=lambda m: sorted(m)), WeightsError,
         "'weight_map' must be a non-empty object mapping tensor names to shard file names "
         "(got a list)"),
    Case("index without weight_map", sharded(index=lambda d: {"metadata": {}}), WeightsError,
         "(got no 'weight_map')"),
    Case("index is a JSON list", sharded(index=lambda d: [d]), WeightsError, "(got no 'weight_map')"),
    Case("index empty weight_map", sharded(weight_map=lambda m: {}), WeightsError,
         "non-empty object"),
    Case("index shard name not a string", sharded(weight_map=lambda m: {k: 1 for k in m}),
         WeightsError, "non-string map"),
    Case("index not JSON", sharded(index=lambda d: "{weight_map"), WeightsError,
         "not a valid safetensors index (invalid JSON"),
    Case("index not UTF-8", sharded(index=lambda d: b'{"weight_map": "\xff"}'),
         WeightsError, "not UTF-8"),
    Case("index shard missing", sharded(drop_shard=True), WeightsError,
         "shard listed in diffusion_pytorch_model.safetensors.index.json is missing"),
    Case("index shard outside the folder",
         sharded(weight_map=lambda m: dict.fromkeys(m, "../x.safetensors")), WeightsError,
         "shard '../x.safetensors' is not a .safetensors file name in the index's own folder"),
    Case("index shard absolute path",
         sharded(weight_map=lambda m: dict.fromkeys(m, "/etc/passwd.safetensors")), WeightsError,
         "shard '/etc/passwd.safetensors' is not a .safetensors file name"),
    Case("index shard not safetensors", sharded(weight_map=lambda m: dict.fromkeys(m, "x.bin")),
         WeightsError, "shard 'x.bin' is not a .safetensors file name"),
    Case("integer tensor where a float one belongs", retype(UNET_W, "conv_in.weight", torch.int8),
         TensorMismatchError, "tensor 'conv_in.weight' is int8 in the file but the model holds "
         "float32"),
    # spec / recipe YAML
    Case("spec yaml not UTF-8", yaml_file(b"name: \xff\xfe\n"), SpecError, "not UTF-8", as_spec),
    Case("spec yaml nested 100k deep", yaml_file(DEEP_YAML), SpecError,
         "invalid YAML: nested too deeply", as_spec),
    Case("spec yaml python tag", yaml_file("name: !!python/object/apply:os.system ['true']\n"),
         SpecError, "python/* tags are refused", as_spec),
    Case("spec yaml syntax error", yaml_file("name: [a\n"), SpecError, "invalid YAML: line",
         as_spec),
    Case("spec yaml norm_num_groups 0",
         yaml_file(SPEC_YAML.replace("norm_num_groups: 8", "norm_num_groups: 0")), SpecError,
         "norm_num_groups must be > 0, got 0", as_spec),
    Case("spec yaml decoder groups 0", yaml_file(SPEC_YAML.replace("norm_num_groups: 4",
                                                                   "norm_num_groups: 0")),
         SpecError, "norm_num_groups must be > 0, got 0", as_spec),
    Case("recipe yaml nested 100k deep", yaml_file(DEEP_YAML, "r.yaml"), RecipeError,
         "nested too deeply", as_recipe),
    Case("recipe yaml python tag", yaml_file("!!python/object:os.system {}\n", "r.yaml"),
         RecipeError, "python/* tags are refused", as_recipe),
    Case("recipe yaml not UTF-8", yaml_file(b"\xc3\x28: 1\n", "r.yaml"), RecipeError,
         "not UTF-8", as_recipe),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_gives_one_line_error_naming_the_file(case, sd15_tiny_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(sd15_tiny_folder, folder)
    named = case.corrupt(folder)
    with pytest.raises(case.error) as info:
        case.load(folder, named)
    message = str(info.value)
    assert "\n" not in message, message
    assert case.message in message, message
    assert named in message or Path(named).name in message, message


def test_cli_prints_one_line(sd15_tiny_folder, tmp_path, cli):
    folder = tmp_path / "model"
    shutil.copytree(sd15_tiny_folder, folder)
    raw(UNET_CFG, "[]")(folder)
    code, out, err = cli("generate", "--model", folder, "--prompt", "a cat",
                         "--out", tmp_path / "x.png")
    assert code == 2 and err.count("\n") == 1 and "unet/config.json: expected a JSON object" in err
