"""Apple's StableDiffusion Swift app, emulated on this host, on real components.

:mod:`mobile_sd.pipeline.swift_app` is the app's logic (tokenizer, RNG, DPM-Solver++, CFG,
decoding) on plain numpy callables. This module plugs components into it:

* :func:`eager_swift_components`: the fp32 eager modules behind the Swift interface (built
  with the export's component builders, optionally with the ``v_to_epsilon`` surgery);
* :func:`bundle_components`: a Core ML bundle's own files (``TextEncoder.mlpackage``,
  ``Unet.mlpackage`` or ``UnetChunk1`` + ``UnetChunk2``, ``VAEDecoder.mlpackage``) run by the
  MIL runtime (:mod:`mobile_sd.runtimes.coreml`), the UNet chunks chained by name as
  ``Unet.swift`` chains them;
* :func:`run_bundle` / :func:`check_bundle`: one image from a bundle (its ``vocab.json`` +
  ``merges.txt``, the settings its ``manifest.json`` says the app must select), and that image
  against the fp32 PyTorch pipeline with the same scheduler (:func:`reference_dpmpp`).

Example (not run by the tests: it needs real artifacts)::

    result = check_bundle("artifacts/ios", build_model("snapfusion"), "a photo of a cat")
    result["psnr_db"]
    # -> 34.2
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from mobile_sd.errors import ParityError
from mobile_sd.pipeline.swift_app import (SwiftBPETokenizer, SwiftComponents, SwiftConfiguration,
                                          reference_dpmpp, run_swift_app)

F32 = np.float32
UNET_PACKAGES = (("Unet.mlpackage",), ("UnetChunk1.mlpackage", "UnetChunk2.mlpackage"))


def eager_swift_components(model, v_to_epsilon: bool = True,
                           latent_size: int | None = None) -> SwiftComponents:
    """The fp32 eager modules of ``model`` behind the Swift interface (``input_ids`` float32,
    ``encoder_hidden_states`` ``[2, D, 1, 77]``), as numpy callables. ``v_to_epsilon``: apply
    the ``v_to_epsilon`` surgery (built for the model's scheduler spec) to the UNet."""
    import torch

    from mobile_sd.export.components import (decoder_component, text_encoder_component,
                                             unet_component)
    from mobile_sd.surgery.v_to_epsilon import VToEpsilonPass

    spec = model.spec
    latent = latent_size or spec.unet.sample_size
    length = spec.text_encoder.max_length
    unet = VToEpsilonPass.for_spec(spec).apply(model.unet) if v_to_epsilon else model.unet
    te = text_encoder_component(model.text_encoder, length, spec.text_encoder.hidden_size, "swift")
    un = unet_component(unet, latent, spec.unet.in_channels, length,
                        spec.unet.cross_attention_dim, "batch2", "swift")
    de = decoder_component(model.decoder, latent, spec.decoder.latent_channels, "swift",
                           spec.decoder.vae_scale_factor)

    def numpy_call(module):
        module.eval()

        @torch.no_grad()
        def call(*arrays):
            out = module(*[torch.from_numpy(np.ascontiguousarray(a)) for a in arrays])
            return out.detach().float().numpy()
        return call
    return SwiftComponents(numpy_call(te.module), numpy_call(un.module), numpy_call(de.module),
                           latent_sample_shape=tuple(un.inputs[0].shape), text_length=length)


class _Timed:
    """A numpy callable around MIL models that adds up its own wall time per component."""

    def __init__(self, models, output: str, seconds: dict, key: str):
        self.models, self.output, self.seconds, self.key = models, output, seconds, key
        self.names = [list(m.input_names) for m in models]

    def __call__(self, *arrays):
        start = time.perf_counter()
        env = dict(zip(self.names[0], arrays))
        for model, names in zip(self.models, self.names):
            missing = [n for n in names if n not in env]
            if missing:
                raise ParityError(f"{model.path.name} needs {missing}, which neither the app's "
                                  "inputs nor the earlier chunk provide: the chunks do not chain")
            env.update(model.predict({n: np.asarray(env[n], F32) for n in names}))
        self.seconds[self.key] = self.seconds.get(self.key, 0.0) + time.perf_counter() - start
        return env[self.output]


def _unet_files(folder: Path) -> list[Path]:
    for names in UNET_PACKAGES:
        if all((folder / n).is_dir() for n in names):
            return [folder / n for n in names]
    raise ParityError(f"{folder}: no Unet.mlpackage nor UnetChunk1.mlpackage + "
                      "UnetChunk2.mlpackage; not a Swift-app bundle")


def bundle_components(folder: str | Path, mode: str = "typed", seconds: dict | None = None,
                      opened: dict | None = None) -> SwiftComponents:
    """A bundle's Core ML packages as the app's components, run by the MIL runtime (``mode``:
    ``typed`` keeps fp16 fp16, ``fp32`` widens). ``seconds`` collects time per component.
    ``opened``: package file name -> :class:`MilModel` already loaded in ``mode`` (reused, and
    filled with what this call loads: a full-size UNet is GBs, so it is never held twice)."""
    from mobile_sd.runtimes.coreml import MilModel

    folder = Path(folder)
    seconds = {} if seconds is None else seconds
    opened = {} if opened is None else opened
    for name in ("TextEncoder.mlpackage", "VAEDecoder.mlpackage"):
        if not (folder / name).is_dir():
            raise ParityError(f"{folder / name}: missing; not a Swift-app bundle")

    def load(path: Path):
        if path.name not in opened:
            opened[path.name] = MilModel(path, mode)
        return opened[path.name]
    text = load(folder / "TextEncoder.mlpackage")
    unets = [load(p) for p in _unet_files(folder)]
    decoder = load(folder / "VAEDecoder.mlpackage")
    sample = unets[0].package.function.inputs["sample"]
    ids = text.package.function.inputs["input_ids"]
    return SwiftComponents(_Timed([text], "last_hidden_state", seconds, "text_encoder"),
                           _Timed(unets, "noise_pred", seconds, "unet"),
                           _Timed([decoder], "image", seconds, "decoder"),
                           latent_sample_shape=tuple(int(d) for d in sample.shape),
                           text_length=int(ids.shape[-1]))


def app_settings(folder: Path) -> dict:
    """What the app must select, as the bundle's ``manifest.json`` records it."""
    try:
        pipeline = json.loads((folder / "manifest.json").read_text()).get("pipeline") or {}
    except (OSError, ValueError) as exc:
        raise ParityError(f"{folder / 'manifest.json'}: unreadable ({exc}); re-export") from exc
    settings = pipeline.get("swift_app")
    if not settings:
        raise ParityError(f"{folder / 'manifest.json'}: no pipeline.swift_app section: not a "
                          "bundle for the Swift app (recipe interface 'swift'), or exported by "
                          "an older mobile-sd: re-export")
    return settings


def run_bundle(folder: str | Path, prompt: str, seed: int = 0, mode: str = "typed",
               steps: int | None = None, guidance: float | None = None,
               seconds: dict | None = None, opened: dict | None = None):
    """One image as the app makes it from the bundle's own files (vocab.json, merges.txt and
    the packages), with the settings its manifest says the app must select."""
    folder = Path(folder)
    settings = app_settings(folder)
    for name in ("vocab.json", "merges.txt"):
        if not (folder / name).is_file():
            raise ParityError(f"{folder / name}: missing; the app tokenizes with the bundle's "
                              "vocab.json + merges.txt")
    tokenizer = SwiftBPETokenizer.from_files(folder / "vocab.json", folder / "merges.txt")
    config = SwiftConfiguration(prompt, step_count=int(steps or settings["steps"]), seed=seed,
                                guidance_scale=float(guidance or settings["guidance"]),
                                scheduler=settings["scheduler"],
                                timestep_spacing=settings["timestep_spacing"],
                                decoder_scale_factor=float(settings["decoder_scale_factor"]))
    return run_swift_app(bundle_components(folder, mode, seconds, opened), config, tokenizer)


def check_bundle(folder: str | Path, model, prompt: str, seed: int = 0,
                 mode: str = "typed", opened: dict | None = None) -> dict:
    """The app's image from the bundle against the fp32 PyTorch pipeline with the same
    scheduler (DPM-Solver++ as the app sets it up), same initial latents and settings.
    ``opened``: MIL models already loaded (see :func:`bundle_components`)."""
    from mobile_sd.metrics import image_stats
    from mobile_sd.parity.eager import at_latent_size

    folder = Path(folder)
    settings, seconds = app_settings(folder), {}
    start = time.perf_counter()
    app = run_bundle(folder, prompt, seed, mode, seconds=seconds, opened=opened)
    latent = app.latents.shape[-1]
    ref = reference_dpmpp(at_latent_size(model, latent), prompt, steps=int(settings["steps"]),
                          guidance=float(settings["guidance"]), seed=seed,
                          scaling_factor=float(settings["decoder_scale_factor"]))
    return {"prompt": prompt, "seed": seed, "mode": mode, "timesteps": app.timesteps,
            **image_stats(ref.image, app.image), "seconds": round(time.perf_counter() - start, 2),
            "component_seconds": {k: round(v, 3) for k, v in seconds.items()},
            "_images": (ref.image, app.image)}
