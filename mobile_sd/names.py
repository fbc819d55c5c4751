"""The pipeline's component names: the one list every package uses (no imports).

``decoder`` is the image decoder (diffusers calls its folder ``vae_decoder/``; Apple's Swift
package ``VAEDecoder``); :data:`FILE_STEMS` are the artifact file names.
"""
from __future__ import annotations

COMPONENT_NAMES = ("text_encoder", "unet", "decoder")
FILE_STEMS = {"text_encoder": "text_encoder", "unet": "unet", "decoder": "vae_decoder"}


def check_component_names(names, where: str, error: type[Exception]) -> None:
    """Raise ``error`` naming ``where`` if any of ``names`` is not a component."""
    unknown = sorted(set(names) - set(COMPONENT_NAMES))
    if unknown:
        raise error(f"{where}: unknown component {', '.join(map(repr, unknown))}; "
                    f"valid components: {', '.join(COMPONENT_NAMES)}")
