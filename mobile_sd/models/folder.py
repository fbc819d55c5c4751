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
gets a diffusers config, other UNets an ``EfficientUNet`` config holding the mobile-sd spec.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mobile_sd import __version__
from mobile_sd.config import from_dict, to_dict
from mobile_sd.errors import ModelFolderError, SpecError
from mobile_sd.models.decoder import (ImageDecoder, autoencoder_config, build_autoencoder,
                                      decoder_spec_from_autoencoder)
from mobile_sd.models.diffusers_compat import (diffusers_config_from_unet_spec,
                                               unet_spec_from_diffusers)
from mobile_sd.models.spec import (DecoderSpec, ModelSpec, SchedulerSpec, UNetSpec)
from mobile_sd.models.text_encoder import clip_config, spec_from_clip_config
from mobile_sd.models.unet import EfficientUNet
from mobile_sd.models.weights import load_weights, save_weights
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
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
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
    if not path.is_file():
        raise ModelFolderError(f"{path}: missing; the component folder must hold its config")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelFolderError(f"{path}: invalid JSON ({exc})") from exc


def _component_dir(root: Path, name: str) -> Path:
    folder = root / name
    if not folder.is_dir():
        raise ModelFolderError(f"{root}: missing component folder {name}/ (a model folder holds "
                               "unet/, text_encoder/, tokenizer/, vae/ or vae_decoder/, "
                               "scheduler/; `mobile-sd init` writes a complete one)")
    return folder


def read_unet_spec(folder: Path) -> UNetSpec:
    config = _read_json(folder / "config.json")
    kind = config.get("_class_name")
    if kind == "UNet2DConditionModel":
        return unet_spec_from_diffusers(config)
    if kind == "EfficientUNet":
        body = {k: v for k, v in config.items() if not k.startswith("_")}
        return from_dict(UNetSpec, body, where=str(folder / "config.json"))
    raise SpecError(f"{folder / 'config.json'}: _class_name {kind!r} is not a UNet mobile-sd "
                    "reads; expected 'UNet2DConditionModel' or 'EfficientUNet'")


def _read_decoder(root: Path) -> tuple[DecoderSpec, Path, tuple[str, ...] | None]:
    if (root / "vae_decoder").is_dir():
        folder = root / "vae_decoder"
        body = {k: v for k, v in _read_json(folder / "config.json").items()
                if not k.startswith("_")}
        return from_dict(DecoderSpec, body, where=str(folder / "config.json")), folder, None
    folder = _component_dir(root, "vae")
    return decoder_spec_from_autoencoder(_read_json(folder / "config.json")), folder, DECODER_KEYS


def _read_scheduler(root: Path, index: dict) -> SchedulerSpec:
    config = _read_json(_component_dir(root, "scheduler") / "scheduler_config.json")
    meta = index.get("_mobile_sd", {})
    known = {f: config[f] for f in ("prediction_type", "timestep_spacing", "num_train_timesteps",
                                    "beta_start", "beta_end", "beta_schedule", "steps_offset")
             if f in config}
    known.update({k: meta[k] for k in ("default_steps", "default_guidance") if k in meta})
    return from_dict(SchedulerSpec, known, where=str(root / "scheduler"))


def _meta_module(build):
    """Build on the meta device: loading assigns the real tensors, so no random init is paid."""
    with torch.device("meta"):
        return build()


def load_model_folder(root: str | Path) -> Model:
    """Read a model folder (ours or a user's trained one of the same layout)."""
    from transformers import CLIPTextModel

    from mobile_sd.models.tokenizer import load_tokenizer

    root = Path(root)
    if not root.is_dir():
        raise ModelFolderError(f"{root}: no such model folder; create one with "
                               "`mobile-sd init --spec snapfusion --out DIR` or point --model "
                               "at a trained diffusers-style folder")
    index = _read_json(root / "model_index.json")
    unet_dir = _component_dir(root, "unet")
    unet = load_weights(_meta_module(lambda: EfficientUNet(read_unet_spec(unet_dir))), unet_dir)
    text_dir = _component_dir(root, "text_encoder")
    text_spec = spec_from_clip_config(_read_json(text_dir / "config.json"))
    clip = CLIPTextModel(clip_config(text_spec))  # small; built for real (non-persistent buffers)
    load_weights(clip, text_dir)
    dec_spec, dec_dir, keep = _read_decoder(root)
    decoder = load_weights(_meta_module(lambda: ImageDecoder(dec_spec)), dec_dir, keep)
    tokenizer = load_tokenizer(_component_dir(root, "tokenizer"))
    meta = index.get("_mobile_sd", {})
    spec = ModelSpec(name=meta.get("spec", root.name), unet=unet.spec, text_encoder=text_spec,
                     decoder=dec_spec, scheduler=_read_scheduler(root, index),
                     seed=meta.get("seed", 0), description=meta.get("description", ""))
    return Model(spec=spec, unet=unet.eval(), text_encoder=clip.eval(), decoder=decoder.eval(),
                 tokenizer=tokenizer, source=str(root))
