"""Core ML recipes and bad input that needs no conversion: compression sections, conflicts,
the CLI's exit code, the scoped coremltools op patches, the chunk chain check."""
from __future__ import annotations

from pathlib import Path

import pytest

from mobile_sd.errors import ExportError, RecipeError
from mobile_sd.recipes import load_recipe

from tests.helpers.paths import REPO as ROOT  # noqa: E402
SHIPPED = ("ios-snapfusion-swift", "ios-snapfusion-fast", "ios-sd15-swift")


def write_recipe(tmp_path: Path, body: str, target: str = "iOS17") -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(f"name: t\nformat: coreml\ntarget: {target}\ninterface: swift\n{body}")
    return path


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_load_with_typed_compression(name):
    from mobile_sd.compress.config import CompressionConfig, PalettizeSpec

    recipe = load_recipe(ROOT / "export_recipes" / f"{name}.yaml")
    unet = recipe.component("unet").compression
    assert isinstance(unet, CompressionConfig) and isinstance(unet.global_, PalettizeSpec)
    assert unet.global_.nbits == 6 and recipe.interface == "swift" and recipe.cfg == "batch2"
    assert recipe.options.unet_chunk_max_bytes == 10**9


def test_fast_recipe_groups_unet_channels_on_ios18():
    recipe = load_recipe(ROOT / "export_recipes" / "ios-snapfusion-fast.yaml")
    assert recipe.target == "iOS18"
    unet = recipe.component("unet").compression.global_
    assert (unet.granularity, unet.group_size) == ("per_grouped_channel", 32)
    assert recipe.component("text_encoder").compression.global_.granularity == "per_tensor"
    assert recipe.component("decoder").compression.global_ is None   # null: left alone


@pytest.mark.parametrize("spec, target, message", [
    ("{nbits: 6, granularity: per_grouped_channel}", "iOS17",
     "palettization granularity 'per_grouped_channel' needs minimum_deployment_target iOS18"),
    ("{nbits: 3}", "iOS17", "3-bit palettization needs target iOS18"),
    ("{nbits: 5}", "iOS18", "nbits: invalid value 5; valid values: 1, 2, 3, 4, 6, 8"),
    ("{dtype: int4, granularity: per_block}", "iOS17", "needs minimum_deployment_target iOS18"),
    ("{nbits: 4, group_size: 8}", "iOS18", "group_size applies only with granularity: "
                                           "per_grouped_channel"),
    ("{dtype: int8, block_size: 32}", "iOS18", "block_size applies only with granularity: "
                                               "per_block"),
])
def test_unsupported_or_conflicting_compression_is_a_recipe_error(tmp_path, spec, target, message):
    path = write_recipe(tmp_path, f"compression:\n  global_: {spec}\n", target)
    with pytest.raises(RecipeError, match=message.replace("(", r"\(")):
        load_recipe(path)


def test_errors_name_the_key_at_fault(tmp_path):
    path = write_recipe(tmp_path, "components:\n  unet:\n    compression:\n"
                                  "      op_type: {conv: {nbits: 3}}\n")
    with pytest.raises(RecipeError, match=r"r.yaml: components.unet.compression.op_type\['conv'\]"):
        load_recipe(path)


def test_supported_options_for_ios18_load(tmp_path):
    path = write_recipe(tmp_path, "compression:\n  global_: {nbits: 3, granularity: "
                                  "per_grouped_channel, group_size: 8}\n"
                                  "  op_type: {linear: {dtype: int4, granularity: per_block}}\n",
                        "iOS18")
    config = load_recipe(path).component("unet").compression
    assert config.resolve("x", "linear").dtype == "int4"
    assert config.resolve("x", "conv").nbits == 3


@pytest.mark.parametrize("body, message", [
    ("components:\n  vae: {}\n", "unknown component 'vae'; valid components: text_encoder, "
                                 "unet, decoder"),
    ("compression:\n  global: {nbits: 6}\n", "unknown key 'global'; valid keys: global_, "
                                             "op_type, op_name, weight_threshold"),
    ("mixed_bit: {target_size_mb: 100}\n", "mixed_bit chooses palettization bits per layer"),
    ("compression:\n  global_: {nbits: 6}\nmixed_bit: {target_size_mb: 100, "
     "candidate_bits: [3, 6]}\n", "candidate_bits must list at least two of 1, 2, 4, 6, 8"),
    ("unet_chunk_max_bytes: 0\n", "unet_chunk_max_bytes must be a positive number of bytes"),
    ("cfg: folded\n", "interface 'swift' .* needs format 'coreml' and cfg 'batch2'"),
])
def test_bad_recipes_say_what_is_valid(tmp_path, body, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write_recipe(tmp_path, body))


def test_cli_exits_2_on_a_bad_recipe_before_building_anything(tmp_path, cli):
    path = write_recipe(tmp_path, "compression:\n  global_: {nbits: 6, granularity: "
                                  "per_grouped_channel}\n")
    out = tmp_path / "out"
    code, _, err = cli("export", "--recipe", path, "--spec", "snapfusion-tiny", "--out", out)
    assert code == 2 and "needs minimum_deployment_target iOS18" in err
    assert not out.exists() and list(tmp_path.iterdir()) == [path]


def test_cli_exits_2_on_a_bad_latent_size(tmp_path, cli):
    path = write_recipe(tmp_path, "")
    code, _, err = cli("export", "--recipe", path, "--spec", "snapfusion-tiny", "--out",
                       tmp_path / "o", "--latent-size", "12")
    assert code == 2 and "latent_size must be a positive multiple of 8, got 12" in err


def test_torch_op_patches_are_scoped():
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY

    from mobile_sd.export.coreml.convert import torch_op_patches

    table = _TORCH_OPS_REGISTRY.name_to_func_mapping
    assert "alias" not in table and "where.scalarother" not in table
    with pytest.raises(KeyError):
        with torch_op_patches():
            assert table["alias"].__name__ == "noop"
            assert table["where.scalarother"].__name__ == "where"
            raise KeyError("boom")   # the registry is restored on errors too
    assert "alias" not in table and "where.scalarother" not in table


def _io(*names, shape=(1, 4)):
    return [{"name": n, "shape": list(shape), "dtype": "float32"} for n in names]


def test_chunk_chain_accepts_outputs_plus_original_inputs_by_name():
    from mobile_sd.export.coreml.chunk import Chunk, check_chain

    original = {"inputs": _io("sample", "timestep"), "outputs": _io("noise_pred")}
    first = Chunk(Path("UnetChunk1.mlpackage"), _io("sample", "timestep"), _io("add_3"), 1)
    second = Chunk(Path("UnetChunk2.mlpackage"), _io("add_3", "timestep"), _io("noise_pred"), 1)
    check_chain(original, [first, second])
    broken = Chunk(second.path, _io("add_4", "timestep"), _io("noise_pred"), 1)
    with pytest.raises(ExportError, match="chunk 2 input 'add_4'.* neither a chunk 1 output"):
        check_chain(original, [first, broken])
