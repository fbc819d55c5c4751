"""Export recipes: typed, frozen, loaded strictly from ``export_recipes/*.yaml`` (data only).

One schema for Core ML, ExecuTorch and ONNX. Defaults apply to every component; the
``components`` mapping overrides them per component (and may switch one off). Unknown keys and
conflicting options are :class:`~mobile_sd.errors.RecipeError` with the valid choices.

>>> recipe = load_recipe("export_recipes/ios-snapfusion-swift.yaml")   # doctest: +SKIP
>>> recipe.component("unet").attention                                 # doctest: +SKIP
'split_einsum_v2'
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Mapping

from mobile_sd.components import COMPONENT_NAMES
from mobile_sd.config import from_dict, load_yaml, to_dict
from mobile_sd.errors import RecipeError

Attention = Literal["original", "split_einsum", "split_einsum_v2"]
Precision = Literal["fp32", "fp16", "int8", "int8_dynamic", "int4_weight"]
DEFAULT_PROMPTS = ("a photo of an astronaut riding a horse on mars",
                   "a watercolor painting of a lighthouse at dawn",
                   "a close-up portrait of a tabby cat, studio lighting")


@dataclass(frozen=True)
class ComponentRecipe:
    """Per-component overrides (``null`` keeps the recipe-wide value)."""
    export: bool = True
    attention: Attention | None = None
    precision: Precision | None = None
    compression: Any = None            # Core ML: three-level compression config (see compress)
    passes: tuple[str, ...] = ()        # extra surgery passes, run after the recipe's own
    fp32_fallback: tuple[str, ...] = ()  # int8: module names kept in fp32 (besides measured ones)
    min_psnr_db: float | None = None    # parity budget vs the fp32 original


@dataclass(frozen=True)
class CalibrationRecipe:
    """Where int8 calibration data comes from: reference-pipeline runs (never random tensors)."""
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    steps: int | None = None            # default: the model's (8 for SnapFusion)
    guidance: float | None = None
    seed: int = 0
    sensitive_fallback: int = 2         # keep the N most sensitive layers (measured) in fp32


@dataclass(frozen=True)
class ParityBudget:
    """Gates for ``mobile-sd parity``, declared next to what they protect."""
    component_min_psnr_db: float = 40.0   # export vs fp32 original, per component output
    lowering_min_psnr_db: float = 60.0    # export vs eager model with the same compression
    e2e_min_psnr_db: float = 30.0         # final image vs fp32 reference pipeline


@dataclass(frozen=True)
class MixedBitRecipe:
    """Choose palettization bits per layer from measured sensitivity to hit a size target."""
    target_size_mb: float
    candidate_bits: tuple[int, ...] = (4, 6, 8)
    max_layers: int = 64                 # measure the largest N weight tensors only


@dataclass(frozen=True)
class Recipe:
    name: str
    format: Literal["coreml", "executorch", "onnx"]
    description: str = ""
    backend: Literal["coreml", "xnnpack", "qnn", "onnxruntime"] = "coreml"
    target: Literal["iOS17", "iOS18", "android", "host"] = "iOS17"
    precision: Precision = "fp16"
    interface: Literal["native", "swift"] = "native"
    latent_size: int = 64
    cfg: Literal["batch2", "folded"] = "batch2"
    attention: Attention = "original"
    compression: Any = None
    mixed_bit: MixedBitRecipe | None = None
    unet_chunk_max_bytes: int | None = None
    weights: Literal["inline", "separate"] = "inline"
    bundled_io: bool = True
    etrecord: Literal["none", "graph", "full"] = "graph"   # graph: weights left out (see
                                                         # exporters/et_etrecord.py)
    onnx_opset: int = 20
    qnn_soc: str = "SM8650"
    components: Mapping[str, ComponentRecipe] = field(default_factory=dict)
    calibration: CalibrationRecipe = field(default_factory=CalibrationRecipe)
    parity: ParityBudget = field(default_factory=ParityBudget)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.components) - set(COMPONENT_NAMES))
        if unknown:
            raise ValueError(f"components: unknown component {', '.join(map(repr, unknown))}; "
                             f"valid components: {', '.join(COMPONENT_NAMES)}")
        for problem in _conflicts(self):
            raise ValueError(problem)

    def component(self, name: str) -> "ResolvedComponent":
        """The effective settings of one component (defaults + overrides)."""
        over = self.components.get(name, ComponentRecipe())
        return ResolvedComponent(
            name=name, export=over.export, attention=over.attention or self.attention,
            precision=over.precision or self.precision,
            compression=over.compression if over.compression is not None else self.compression,
            passes=over.passes, fp32_fallback=over.fp32_fallback,
            min_psnr_db=over.min_psnr_db or self.parity.component_min_psnr_db)

    def exported_components(self) -> list[str]:
        return [n for n in COMPONENT_NAMES if self.component(n).export]

    def to_dict(self) -> dict:
        return to_dict(self)


@dataclass(frozen=True)
class ResolvedComponent:
    name: str
    export: bool
    attention: str
    precision: str
    compression: Any
    passes: tuple[str, ...]
    fp32_fallback: tuple[str, ...]
    min_psnr_db: float


_BACKENDS = {"coreml": {"coreml"}, "executorch": {"xnnpack", "coreml", "qnn"},
             "onnx": {"onnxruntime"}}
_PRECISIONS = {("coreml", "coreml"): {"fp16", "fp32"},
               ("executorch", "xnnpack"): {"fp32", "fp16", "int8", "int8_dynamic", "int4_weight"},
               ("executorch", "coreml"): {"fp16", "fp32", "int8", "int4_weight"},
               ("executorch", "qnn"): {"fp16", "int8"},
               ("onnx", "onnxruntime"): {"fp32", "fp16"}}


def _conflicts(r: Recipe):
    """Yield a message for each option that cannot go with another."""
    if r.backend not in _BACKENDS[r.format]:
        yield (f"backend {r.backend!r} is not available for format {r.format!r}; valid: "
               f"{', '.join(sorted(_BACKENDS[r.format]))}")
        return
    allowed = _PRECISIONS[(r.format, r.backend)]
    for name in COMPONENT_NAMES:
        over = r.components.get(name, ComponentRecipe())
        precision = over.precision or r.precision
        if precision not in allowed:
            yield (f"precision {precision!r} ({name}) is not supported by {r.format}/{r.backend};"
                   f" valid: {', '.join(sorted(allowed))}")
    if r.interface == "swift" and (r.format != "coreml" or r.cfg != "batch2"):
        yield ("interface 'swift' (Apple's StableDiffusion Swift package) needs format 'coreml' "
               "and cfg 'batch2': the Swift pipeline runs guidance itself")
    apple = r.backend == "coreml"
    if apple and r.target not in ("iOS17", "iOS18"):
        yield f"target {r.target!r} is not a Core ML target; use 'iOS17' or 'iOS18'"
    if not apple and r.target in ("iOS17", "iOS18"):
        yield (f"target {r.target!r} needs backend 'coreml'; backend {r.backend!r} targets "
               "'android' or 'host'")
    if r.format != "coreml" and (r.compression is not None or r.mixed_bit is not None
                                 or any(c.compression is not None for c in r.components.values())):
        yield ("compression (palettization / Core ML weight quantization) applies to format "
               "'coreml'; for ExecuTorch/ONNX use 'precision' (int8, int8_dynamic, int4_weight)")
    if r.unet_chunk_max_bytes is not None and r.format != "coreml":
        yield "unet_chunk_max_bytes (UNet chunking) applies to format 'coreml' only"
    if r.unet_chunk_max_bytes is not None and r.unet_chunk_max_bytes <= 0:
        yield (f"unet_chunk_max_bytes must be a positive number of bytes (e.g. 1000000000 for "
               f"the iPhone's ~1 GB per model), got {r.unet_chunk_max_bytes}")
    if r.weights == "separate" and r.format != "executorch":
        yield "weights: separate (.ptd file) applies to format 'executorch' only"
    if r.latent_size % 8 or r.latent_size <= 0:
        yield f"latent_size must be a positive multiple of 8, got {r.latent_size}"
    if not r.exported_components():
        yield "every component has export: false; nothing to export"


def load_recipe(path: str | Path) -> Recipe:
    """Load and validate a recipe YAML (unknown keys and conflicts are RecipeError)."""
    path = Path(path)
    if not path.is_file():
        shipped = Path(__file__).resolve().parents[1] / "export_recipes"
        names = sorted(p.name for p in shipped.glob("*.yaml")) if shipped.is_dir() else []
        raise RecipeError(f"{path}: no such recipe file" +
                          (f"; shipped recipes: {', '.join(names)}" if names else ""))
    recipe = from_dict(Recipe, load_yaml(path, RecipeError), where=path.name, error=RecipeError)
    return _check_compression(recipe, path.name)


def _check_compression(recipe: Recipe, where: str) -> Recipe:
    """Parse the Core ML compression sections into typed configs (validated for the target)."""
    if recipe.format != "coreml":
        return recipe
    from mobile_sd.compress.recipe import check_mixed_bit, parse_compression

    top = parse_compression(recipe.compression, recipe.target, f"{where}: compression")
    comps = {name: dataclasses.replace(c, compression=parse_compression(
                 c.compression, recipe.target, f"{where}: components.{name}.compression"))
             if c.compression is not None else c for name, c in recipe.components.items()}
    recipe = dataclasses.replace(recipe, compression=top, components=MappingProxyType(comps))
    check_mixed_bit(recipe.mixed_bit, recipe.component("unet").compression, recipe.target,
                    f"{where}: mixed_bit")
    return recipe
