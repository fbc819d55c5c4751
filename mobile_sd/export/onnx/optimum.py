"""``interface: optimum``: the ONNX folder diffusers/optimum's ``ORTStableDiffusionPipeline`` reads.

::

    model_index.json                    pipeline class; tokenizer + scheduler classes
    text_encoder/model.onnx + config.json   input_ids -> last_hidden_state
    unet/model.onnx + config.json           sample, timestep (scalar), encoder_hidden_states -> out_sample
    vae_decoder/model.onnx + config.json    latent_sample -> sample (in [-1, 1])
    tokenizer/  vocab.json, merges.txt, tokenizer_config.json (model_max_length), special_tokens_map.json
    scheduler/scheduler_config.json     DDIMScheduler, v-prediction, trailing spacing

What optimum-onnx 0.1.0 reads (``optimum/onnxruntime/modeling_diffusion.py``): a session per
``<part>/model.onnx``, each with its ``config.json``; from the configs only the UNet's
``in_channels`` and ``sample_size``, the decoder's ``block_out_channels`` and ``scaling_factor``
(missing, optimum silently uses 2^(blocks-1), a wrong image) and the text encoder's
``num_hidden_layers``; the scheduler and tokenizer classes come from ``model_index.json``.
The pipeline itself is diffusers' ``StableDiffusionPipeline.__call__``.

Axes: batch is dynamic everywhere (1 or 2 x images per prompt under CFG, prompts per call);
the UNet's and decoder's height and width are dynamic (the UNet's in multiples of its total
downsampling, which torch.export derives); the text encoder's 77 tokens are static (CLIP's
position table is that long).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mobile_sd.errors import ExportError
from mobile_sd.manifest import FileEntry
from mobile_sd.names import FILE_STEMS

MODEL_FILE = "model.onnx"
ONNX_CLASS = ["diffusers", "OnnxRuntimeModel"]
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def model_path(out_dir: Path, name: str) -> Path:
    """``<out>/<component folder>/model.onnx`` (the decoder's folder is ``vae_decoder``)."""
    return out_dir / FILE_STEMS[name] / MODEL_FILE


def dynamic_shapes(name: str) -> tuple:
    """torch.export dynamic shapes of the optimum I/O (``Dim.AUTO``: torch.export finds the
    valid range, e.g. heights in multiples of the UNet's downsampling)."""
    from torch.export import Dim

    batch, spatial = {0: Dim.AUTO}, {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO}
    return {"text_encoder": (batch,), "unet": (spatial, None, batch),
            "decoder": (spatial,)}[name]


def component_config(name: str, spec) -> dict[str, Any]:
    """The ``config.json`` beside ``<part>/model.onnx``: the keys optimum reads, and a few
    that say what the graph is."""
    if name == "unet":
        u = spec.unet
        return {"_class_name": "UNet2DConditionModel", "in_channels": u.in_channels,
                "out_channels": u.out_channels, "sample_size": u.sample_size,
                "cross_attention_dim": u.cross_attention_dim, "time_cond_proj_dim": None}
    if name == "decoder":
        d = spec.decoder
        if 2 ** (len(d.block_out_channels) - 1) != d.vae_scale_factor:
            raise ExportError(f"decoder: optimum derives the VAE scale factor as 2^(blocks-1) = "
                              f"{2 ** (len(d.block_out_channels) - 1)} from block_out_channels, "
                              f"but this decoder upsamples {d.vae_scale_factor}x; use "
                              "interface: native")
        return {"_class_name": "AutoencoderKL", "block_out_channels": list(d.block_out_channels),
                "latent_channels": d.latent_channels, "out_channels": d.out_channels,
                "scaling_factor": d.scaling_factor}
    from mobile_sd.models.text_encoder import clip_config

    config = clip_config(spec.text_encoder).to_dict()
    config["architectures"] = ["CLIPTextModel"]
    return config


def _write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def _model_index(spec) -> dict[str, Any]:
    return {"_class_name": "ORTStableDiffusionPipeline",
            "_mobile_sd": {"spec": spec.name, "default_steps": spec.scheduler.default_steps,
                           "default_guidance": spec.scheduler.default_guidance},
            "text_encoder": ONNX_CLASS, "unet": ONNX_CLASS, "vae_decoder": ONNX_CLASS,
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "safety_checker": [None, None], "feature_extractor": [None, None],
            "requires_safety_checker": False}


def _write_tokenizer(model, out: Path) -> list[Path]:
    """The model folder's own tokenizer files when it has them, else SD-v1.5's (ours);
    ``model_max_length`` set either way (without it the pipeline pads to 10^30 tokens)."""
    from mobile_sd.models.tokenizer import write_tokenizer_folder

    max_length = model.spec.text_encoder.max_length
    folder = Path(model.source) if model.source else None
    source = folder / "tokenizer" if folder is not None and folder.is_dir() else None
    if source is not None and all((source / f).is_file() for f in TOKENIZER_FILES[:2]):
        out.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, out / name)
        config_path = out / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        if config.get("model_max_length") != max_length:
            _write_json(config_path, {**config, "model_max_length": max_length})
    else:
        write_tokenizer_folder(out, max_length=max_length)
    return [out / name for name in TOKENIZER_FILES if (out / name).is_file()]


def write_pipeline_files(model, out_dir: Path, manifest) -> None:
    """Write every file besides the graphs and record it in ``manifest`` (sha256 and size):
    each ``config.json`` with its component, the rest in ``extra_files``."""
    from mobile_sd.models.folder import scheduler_config

    spec = model.spec
    for name, comp in manifest.components.items():
        path = _write_json(model_path(out_dir, name).with_name("config.json"),
                           component_config(name, spec))
        comp.files.append(FileEntry.of(out_dir, path, role="config"))
    extra = [(_write_json(out_dir / "model_index.json", _model_index(spec)), "pipeline_index"),
             (_write_json(out_dir / "scheduler" / "scheduler_config.json",
                          scheduler_config(spec.scheduler)), "scheduler")]
    extra += [(p, "tokenizer") for p in _write_tokenizer(model, out_dir / "tokenizer")]
    manifest.extra_files.extend(FileEntry.of(out_dir, p, role=role) for p, role in extra)
