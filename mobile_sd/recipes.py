"""Export recipes: typed, frozen, loaded strictly from ``export_recipes/*.yaml`` (data only).

One schema for Core ML, ExecuTorch and ONNX. Defaults apply to every component; the
``components`` mapping overrides them per component (and may switch one off). Unknown keys and
conflicting options are :class:`~mobile_sd.errors.RecipeError` with the valid choices.

Example (not run by the tests: it needs real artifacts)::

    recipe = load_recipe("export_recipes/ios-snapfusion-swift.yaml")
    recipe.component("unet").attention
    # -> 'split_einsum_v2'
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Mapping, Union

from mobile_sd.names import COMPONENT_NAMES, check_component_names
from mobile_sd.config import from_dict, load_yaml, to_dict
from mobile_sd.errors import RecipeError, SpecError

Attention = Literal["original", "split_einsum", "split_einsum_v2"]
Precision = Literal["fp32", "fp16", "int8", "int8_dynamic", "int4_weight", "w8a16"]
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


# ----------------------------------------------------------------------------- format groups
@dataclass(frozen=True)
class CoreMLOptions:
    """Options of ``format: coreml`` (Core ML packages)."""
    compression: Any = None              # three levels: global_ < op_type < op_name (compress/)
    mixed_bit: MixedBitRecipe | None = None
    unet_chunk_max_bytes: int | None = None

    def problems(self, recipe: "Recipe"):
        if self.unet_chunk_max_bytes is not None and self.unet_chunk_max_bytes <= 0:
            yield (f"unet_chunk_max_bytes must be a positive number of bytes (e.g. 1000000000 "
                   f"for the iPhone's ~1 GB per model), got {self.unet_chunk_max_bytes}")


@dataclass(frozen=True)
class ExecuTorchOptions:
    """Options of ``format: executorch`` (``.pte`` programs)."""
    weights: Literal["inline", "separate"] = "inline"
    bundled_io: bool = True
    etrecord: Literal["none", "graph", "full"] = "graph"   # graph: weights left out (see
                                                         # export/executorch/etrecord.py)
    qnn_soc: str = "SM8650"

    def problems(self, recipe: "Recipe"):
        return iter(())


@dataclass(frozen=True)
class OnnxOptions:
    """Options of ``format: onnx`` (the folder layout follows ``interface``: ``optimum`` writes
    the diffusers/optimum ONNX folder, see ``mobile_sd/export/onnx/optimum.py``)."""
    onnx_opset: int = 20

    def problems(self, recipe: "Recipe"):
        return iter(())


#: Snapdragon parts of ``format: qnn`` (the table with ids and HTP arch is
#: mobile_sd/runtimes/qnn/socs.py, a layer above; tests/runtimes/qnn/test_socs.py keeps them equal).
QNN_SOCS = ("SM8550", "SM8650", "SM8750")


@dataclass(frozen=True)
class QnnOptions:
    """Options of ``format: qnn`` (QNN HTP context binaries through ONNX Runtime's QNN EP)."""
    soc: str = "SM8650"                  # Snapdragon part: SM8550 / SM8650 / SM8750
    opset: int = 21                      # 16-bit QuantizeLinear (w8a16) needs opset >= 21
    mask_floor: float = -100.0           # w8a16: additive attention masks clamped to this

    def problems(self, recipe: "Recipe"):
        if self.soc.upper() not in QNN_SOCS:
            yield (f"unknown Qualcomm SoC {self.soc!r} for the QNN HTP backend; known: "
                   f"{', '.join(QNN_SOCS)}")
        if self.opset < 21:
            yield f"opset must be >= 21 for the QNN HTP (16-bit Q/DQ), got {self.opset}"
        if self.mask_floor >= 0:
            yield f"mask_floor must be negative (e.g. -100), got {self.mask_floor}"


FormatOptions = Union[CoreMLOptions, ExecuTorchOptions, OnnxOptions, QnnOptions]
FORMAT_OPTIONS: dict[str, type] = {"coreml": CoreMLOptions, "executorch": ExecuTorchOptions,
                                   "onnx": OnnxOptions, "qnn": QnnOptions}


@dataclass(frozen=True)
class Recipe:
    """One export: what every format shares, plus ``options`` of its own format.

    The YAML file is flat (``weights: separate`` beside ``precision``); :func:`load_recipe`
    routes each key to the shared fields or to the format's options group, and a key of
    another format's group is an error naming that format.
    """
    name: str
    format: Literal["coreml", "executorch", "onnx", "qnn"]
    description: str = ""
    backend: Literal["coreml", "xnnpack", "qnn", "onnxruntime", "htp"] = "coreml"
    target: Literal["iOS17", "iOS18", "android", "host"] = "iOS17"
    precision: Precision = "fp16"
    interface: Literal["native", "swift", "optimum"] = "native"
    latent_size: int = 64
    cfg: Literal["batch2", "folded"] = "batch2"
    attention: Attention = "original"
    components: Mapping[str, ComponentRecipe] = field(default_factory=dict)
    calibration: CalibrationRecipe = field(default_factory=CalibrationRecipe)
    parity: ParityBudget = field(default_factory=ParityBudget)
    options: FormatOptions | None = None   # None: the format's defaults

    def __post_init__(self) -> None:
        if self.options is None and self.format in FORMAT_OPTIONS:
            object.__setattr__(self, "options", FORMAT_OPTIONS[self.format]())
        check_component_names(self.components, "components", ValueError)
        for problem in _conflicts(self):
            raise ValueError(problem)

    @classmethod
    def from_flat(cls, where: str = "recipe", error: type[SpecError] = RecipeError,
                  **data) -> "Recipe":
        """A recipe from flat keys, as in a YAML file (see :func:`load_recipe`)."""
        return _from_flat(data, where, error)

    def component(self, name: str) -> "ResolvedComponent":
        """The effective settings of one component (defaults + overrides)."""
        over = self.components.get(name, ComponentRecipe())
        top = getattr(self.options, "compression", None)
        return ResolvedComponent(
            name=name, export=over.export, attention=over.attention or self.attention,
            precision=over.precision or self.precision,
            compression=over.compression if over.compression is not None else top,
            passes=over.passes, fp32_fallback=over.fp32_fallback,
            min_psnr_db=over.min_psnr_db or self.parity.component_min_psnr_db)

    def exported_components(self) -> list[str]:
        return [n for n in COMPONENT_NAMES if self.component(n).export]

    def to_dict(self) -> dict:
        """The flat form a YAML file holds (the options group's keys beside the shared ones)."""
        data = {f.name: to_dict(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.name != "options"}
        return {**data, **to_dict(self.options)}


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


_SHARED_KEYS = tuple(f.name for f in dataclasses.fields(Recipe) if f.name != "options")


def _from_flat(data: dict, where: str, error: type[SpecError]) -> Recipe:
    """Split flat keys into the shared fields and the format's options group."""
    fmt = data.get("format")
    group = FORMAT_OPTIONS.get(fmt) if isinstance(fmt, str) else None
    own = {f.name for f in dataclasses.fields(group)} if group else set()
    shared, options = {}, {}
    for key, value in data.items():
        if key in _SHARED_KEYS:
            shared[key] = value
        elif key in own:
            options[key] = value
        else:
            raise error(_unknown_key(key, fmt, own, where))
    recipe = from_dict(Recipe, shared, where=where, error=error)
    if group is None:
        return recipe
    return dataclasses.replace(recipe, options=from_dict(group, options, where=where, error=error))


def _unknown_key(key: str, fmt, own: set[str], where: str) -> str:
    owners = [name for name, cls in FORMAT_OPTIONS.items()
              if key in {f.name for f in dataclasses.fields(cls)}]
    valid = ", ".join(sorted(set(_SHARED_KEYS) | own))
    if owners:
        return (f"{where}: '{key}' is an option of format {' / '.join(map(repr, owners))}, not "
                f"of format {fmt!r}; valid keys for {fmt!r}: {valid}")
    return f"{where}: unknown key '{key}'; valid keys: {valid}"


_BACKENDS = {"coreml": {"coreml"}, "executorch": {"xnnpack", "coreml", "qnn"},
             "onnx": {"onnxruntime"}, "qnn": {"htp"}}
_PRECISIONS = {("coreml", "coreml"): {"fp16", "fp32"},
               ("executorch", "xnnpack"): {"fp32", "fp16", "int8", "int8_dynamic", "int4_weight"},
               ("executorch", "coreml"): {"fp16", "fp32", "int8", "int4_weight"},
               ("executorch", "qnn"): {"fp16", "int8"},
               ("onnx", "onnxruntime"): {"fp32", "fp16"},
               ("qnn", "htp"): {"fp16", "w8a16"}}


def _conflicts(r: Recipe):
    """Yield a message for each shared option that cannot go with another; the format's
    options group checks its own (``problems``)."""
    if r.backend not in _BACKENDS[r.format]:
        yield (f"backend {r.backend!r} is not available for format {r.format!r}; valid: "
               f"{', '.join(sorted(_BACKENDS[r.format]))}")
        return
    if not isinstance(r.options, FORMAT_OPTIONS[r.format]):
        yield f"options of format {r.format!r} must be {FORMAT_OPTIONS[r.format].__name__}"
        return
    allowed = _PRECISIONS[(r.format, r.backend)]
    for name in COMPONENT_NAMES:
        over = r.components.get(name, ComponentRecipe())
        precision = over.precision or r.precision
        if precision not in allowed:
            yield (f"precision {precision!r} ({name}) is not supported by {r.format}/{r.backend};"
                   f" valid: {', '.join(sorted(allowed))}")
        if over.compression is not None and r.format != "coreml":
            yield ("compression (palettization / Core ML weight quantization) applies to format "
                   "'coreml'; for ExecuTorch/ONNX use 'precision' (int8, int8_dynamic, int4_weight)")
    if r.interface == "swift" and (r.format != "coreml" or r.cfg != "batch2"):
        yield ("interface 'swift' (Apple's StableDiffusion Swift package) needs format 'coreml' "
               "and cfg 'batch2': the Swift pipeline runs guidance itself")
    if r.interface == "optimum" and (r.format != "onnx" or r.cfg != "batch2"):
        yield ("interface 'optimum' (Hugging Face optimum's ONNX pipeline) needs format 'onnx' "
               "and cfg 'batch2': optimum's pipeline runs guidance itself")
    apple = r.backend == "coreml"
    if apple and r.target not in ("iOS17", "iOS18"):
        yield f"target {r.target!r} is not a Core ML target; use 'iOS17' or 'iOS18'"
    if not apple and r.target in ("iOS17", "iOS18"):
        yield (f"target {r.target!r} needs backend 'coreml'; backend {r.backend!r} targets "
               "'android' or 'host'")
    if r.latent_size % 8 or r.latent_size <= 0:
        yield f"latent_size must be a positive multiple of 8, got {r.latent_size}"
    yield from r.options.problems(r)
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
    try:
        recipe = _from_flat(load_yaml(path, RecipeError), path.name, RecipeError)
    except ValueError as exc:   # Recipe.__post_init__: options that cannot go together
        raise RecipeError(f"{path.name}: {exc}") from None
    return _check_compression(recipe, path.name)


def _check_compression(recipe: Recipe, where: str) -> Recipe:
    """Parse the Core ML compression sections into typed configs (validated for the target)."""
    if recipe.format != "coreml":
        return recipe
    from mobile_sd.compress.recipe import check_mixed_bit, parse_compression

    options = recipe.options
    top = parse_compression(options.compression, recipe.target, f"{where}: compression")
    comps = {name: dataclasses.replace(c, compression=parse_compression(
                 c.compression, recipe.target, f"{where}: components.{name}.compression"))
             if c.compression is not None else c for name, c in recipe.components.items()}
    recipe = dataclasses.replace(recipe, options=dataclasses.replace(options, compression=top),
                                 components=MappingProxyType(comps))
    check_mixed_bit(options.mixed_bit, recipe.component("unet").compression, recipe.target,
                    f"{where}: mixed_bit")
    return recipe
