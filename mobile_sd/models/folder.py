"""Write and read diffusers-style model folders.

Layout (``mobile-sd init`` writes it; a user's trained folder of the same layout loads too)::

    model_index.json
    unet/          config.json + diffusion_pytorch_model.safetensors
    text_encoder/  config.json + model.safetensors           (transformers CLIPTextModel)
    tokenizer/     vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
    vae/           full AutoencoderKL (SD-style)      -- or --
    vae_decoder/   decoder only (distilled decoders): config.json + weights
    scheduler/     scheduler_config.json               (DDIMScheduler)

Standard parts stay readable by ``from_pretrained`` of diffusers/transformers; the SD-v1.5 UNet
(and any UNet diffusers can express, e.g. BK-SDM's without a mid block) gets a diffusers config,
other UNets an ``EfficientUNet`` config holding the mobile-sd spec.

Reading also accepts what published folders hold: weights sharded with a
``*.safetensors.index.json``, stored in float16/bfloat16 (upcast to float32; the stored dtype is
kept in ``Model.stored_dtypes``), as ``*.fp16.safetensors`` variants (``variant="fp16"``), and
text encoders saved by transformers 4.x (``text_model.``-prefixed names).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mobile_sd import __version__
from mobile_sd.config import from_dict, one_line, read_json_object, to_dict
from mobile_sd.errors import ModelFolderError, SpecError
from mobile_sd.models.decoder import (ImageDecoder, autoencoder_config, build_autoencoder,
                                      decoder_spec_from_autoencoder)
from mobile_sd.models.diffusers_compat import (diffusers_config_from_unet_spec,
                                               unet_spec_from_diffusers)
from mobile_sd.models.spec import (DecoderSpec, ModelSpec, SchedulerSpec, UNetSpec)
from mobile_sd.models.text_encoder import (clip_config, normalize_clip_state_dict,
                                           spec_from_clip_config)
from mobile_sd.models.unet import EfficientUNet
from mobile_sd.models.weights import check_variant, load_weights, save_weights
from mobile_sd.models.zoo import Model
from mobile_sd.utils.files import atomic_output_dir

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
DECODER_KEYS = ("decoder.", "post_quant_conv.")


def scheduler_config(spec: SchedulerSpec) -> dict[str, Any]:
    """A diffusers ``DDIMScheduler`` config."""
    return {"_class_name": "DDIMScheduler", "num_train_timesteps": spec.num_train_timesteps,
            "beta_start": spec.beta_start, "beta_end": spec.beta_end,
            "beta_schedule": spec.beta_schedule, "prediction_type": spec.prediction_type,
            "timestep_spacing": spec.timestep_spacing, "steps_offset": spec.steps_offset,
            "clip_sample": False, "set_alpha_to_one": False}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_model_folder(model: Model, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` as a diffusers-style folder (atomically: complete or not at all)."""
    from mobile_sd.models.tokenizer import write_tokenizer_folder

    spec = model.spec
    with atomic_output_dir(out, overwrite=overwrite, kind="model") as tmp:
        _write_unet(model.unet, tmp / "unet")
        cfg = clip_config(spec.text_encoder).to_dict()
        cfg["architectures"] = ["CLIPTextModel"]
        _write_json(tmp / "text_encoder" / "config.json", cfg)
        save_weights(model.text_encoder.state_dict(), tmp / "text_encoder" / "model.safetensors")
        write_tokenizer_folder(tmp / "tokenizer", max_length=spec.text_encoder.max_length)
        decoder_dir = _write_decoder(model, tmp)
        _write_json(tmp / "scheduler" / "scheduler_config.json", scheduler_config(spec.scheduler))
        _write_json(tmp / "model_index.json", _model_index(spec, decoder_dir))
    return Path(out)


def _write_unet(unet: EfficientUNet, folder: Path) -> None:
    config = diffusers_config_from_unet_spec(unet.spec) or {
        "_class_name": "EfficientUNet", **to_dict(unet.spec)}
    config["_mobile_sd_version"] = __version__
    _write_json(folder / "config.json", config)
    save_weights(unet.state_dict(), folder / UNET_WEIGHTS)


def _write_decoder(model: Model, tmp: Path) -> str:
    spec = model.spec.decoder
    if spec.format == "decoder":
        config = {"_class_name": "ImageDecoder", "_mobile_sd_version": __version__,
                  **to_dict(spec)}
        _write_json(tmp / "vae_decoder" / "config.json", config)
        save_weights(model.decoder.state_dict(), tmp / "vae_decoder" / UNET_WEIGHTS)
        return "vae_decoder"
    # A full AutoencoderKL (encoder seeded too) whose decoder half is ours, bit for bit.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model.spec.seed + 3)
        vae = build_autoencoder(spec)
    vae.load_state_dict(model.decoder.state_dict(), strict=False)
    _write_json(tmp / "vae" / "config.json", autoencoder_config(spec))
    save_weights(vae.state_dict(), tmp / "vae" / UNET_WEIGHTS)
    return "vae"


def _model_index(spec: ModelSpec, decoder_dir: str) -> dict[str, Any]:
    sd_like = spec.decoder.format == "vae" and diffusers_config_from_unet_spec(spec.unet)
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionPipeline" if sd_like else "MobileSDPipeline",
        "_mobile_sd": {"version": __version__, "spec": spec.name, "description": spec.description,
                       "default_steps": spec.scheduler.default_steps,
                       "default_guidance": spec.scheduler.default_guidance, "seed": spec.seed},
        "unet": ["diffusers", "UNet2DConditionModel"] if sd_like else ["mobile_sd", "EfficientUNet"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        decoder_dir: (["diffusers", "AutoencoderKL"] if decoder_dir == "vae"
                      else ["mobile_sd", "ImageDecoder"]),
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    if sd_like:  # lets diffusers' StableDiffusionPipeline.from_pretrained read the folder
        index.update(safety_checker=[None, None], feature_extractor=[None, None],
                     requires_safety_checker=False)
    return index


def _read_json(path: Path) -> dict:
    """A component's JSON config, which must be a JSON object; one-line errors naming it."""
    if not path.is_file():
        raise ModelFolderError(f"{path}: missing; the component folder must hold its config")
    return read_json_object(path, ModelFolderError)


def _component_dir(root: Path, name: str) -> Path:
    folder = root / name
    if not folder.is_dir():
        raise ModelFolderError(f"{root}: missing component folder {name}/ (a model folder holds "
                               "unet/, text_encoder/, tokenizer/, vae/ or vae_decoder/, "
                               "scheduler/; `mobile-sd init` writes a complete one)")
    return folder


def _body(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def read_unet_spec(folder: Path) -> UNetSpec:
    path = folder / "config.json"
    config = _read_json(path)
    kind = config.get("_class_name")
    if kind == "UNet2DConditionModel":
        return unet_spec_from_diffusers(config, where=str(path))
    if kind == "EfficientUNet":
        return from_dict(UNetSpec, _body(config), where=str(path))
    raise SpecError(f"{path}: _class_name {kind!r} is not a UNet mobile-sd "
                    "reads; expected 'UNet2DConditionModel' or 'EfficientUNet'")


def _read_decoder(root: Path) -> tuple[DecoderSpec, Path, tuple[str, ...] | None]:
    if (root / "vae_decoder").is_dir():
        path = root / "vae_decoder" / "config.json"
        return from_dict(DecoderSpec, _body(_read_json(path)), where=str(path)), path.parent, None
    path = _component_dir(root, "vae") / "config.json"
    return (decoder_spec_from_autoencoder(_read_json(path), where=str(path)), path.parent,
            DECODER_KEYS)


def _read_scheduler(root: Path, meta: dict) -> SchedulerSpec:
    path = _component_dir(root, "scheduler") / "scheduler_config.json"
    config = _read_json(path)
    known = {f: config[f] for f in ("prediction_type", "timestep_spacing", "num_train_timesteps",
                                    "beta_start", "beta_end", "beta_schedule", "steps_offset")
             if f in config}
    known.update({k: meta[k] for k in ("default_steps", "default_guidance") if k in meta})
    return from_dict(SchedulerSpec, known, where=str(path))


def _build(build, where: Path, device: str | None = "meta"):
    """Build a module (on the meta device: loading assigns the real tensors, so no random init
    is paid); a config the spec checks let through but torch/diffusers refuse names its file."""
    try:
        if device is None:
            return build()
        with torch.device(device):
            return build()
    except (ValueError, TypeError, RuntimeError, ArithmeticError) as exc:
        raise SpecError(f"{where}: cannot build this component ({one_line(exc)})") from None


def load_model_folder(root: str | Path, variant: str | None = None) -> Model:
    """Read a model folder (ours or a user's trained one of the same layout).

    ``variant`` (like diffusers' ``variant="fp16"``) reads ``*.{variant}.safetensors`` in every
    weights folder and fails naming the file when one is missing. Without it the plain files are
    read, or, in a folder that has none but exactly one variant, that variant. Weights stored in
    float16/bfloat16 are upcast to float32; ``Model.stored_dtypes`` / ``Model.variants`` say what
    was stored. Every problem is a one-line :class:`ModelFolderError` / :class:`SpecError`.
    """
    from transformers import CLIPTextModel

    from mobile_sd.models.tokenizer import load_tokenizer

    check_variant(variant)
    root = Path(root)
    if not root.is_dir():
        raise ModelFolderError(f"{root}: no such model folder; create one with "
                               "`mobile-sd init --spec snapfusion --out DIR` or point --model "
                               "at a trained diffusers-style folder")
    index = _read_json(root / "model_index.json")
    meta = index.get("_mobile_sd")
    meta = meta if isinstance(meta, dict) else {}
    info = {}
    unet_dir = _component_dir(root, "unet")
    unet_spec = read_unet_spec(unet_dir)
    unet = _build(lambda: EfficientUNet(unet_spec), unet_dir / "config.json")
    info["unet"] = load_weights(unet, unet_dir, variant=variant)
    text_dir = _component_dir(root, "text_encoder")
    text_spec = spec_from_clip_config(_read_json(text_dir / "config.json"),
                                      where=str(text_dir / "config.json"))
    # small; built for real (non-persistent buffers)
    clip = _build(lambda: CLIPTextModel(clip_config(text_spec)), text_dir / "config.json", None)
    info["text_encoder"] = load_weights(clip, text_dir, variant=variant,
                                        rename=normalize_clip_state_dict)
    dec_spec, dec_dir, keep = _read_decoder(root)
    decoder = _build(lambda: ImageDecoder(dec_spec), dec_dir / "config.json")
    info["decoder"] = load_weights(decoder, dec_dir, keep, variant=variant)
    tokenizer = load_tokenizer(_component_dir(root, "tokenizer"))
    seed = meta.get("seed", 0)
    spec = ModelSpec(name=str(meta.get("spec", root.name)), unet=unet.spec,
                     text_encoder=text_spec, decoder=dec_spec,
                     scheduler=_read_scheduler(root, meta),
                     seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else 0,
                     description=str(meta.get("description", "")))
    return Model(spec=spec, unet=unet.eval(), text_encoder=clip.eval(), decoder=decoder.eval(),
                 tokenizer=tokenizer, source=str(root),
                 stored_dtypes={k: v.stored_dtype for k, v in info.items()},
                 variants={k: v.variant for k, v in info.items()})
