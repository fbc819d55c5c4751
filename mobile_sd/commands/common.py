"""Arguments shared by several commands: which model (``--model DIR`` or ``--spec NAME``)."""
from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_SPEC = "snapfusion"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--model", type=Path, help="a diffusers-style model folder (trained weights)")
    group.add_argument("--spec", help=f"an architecture spec name or .yaml, built with seeded "
                       f"random weights (default: {DEFAULT_SPEC})")


def load_model_arg(args: argparse.Namespace, with_tokenizer: bool = True):
    """The model chosen by ``--model DIR`` or ``--spec NAME`` (random weights)."""
    from mobile_sd.models.folder import load_model_folder
    from mobile_sd.models.zoo import build_model

    if getattr(args, "model", None) is not None:
        return load_model_folder(args.model)
    return build_model(args.spec or DEFAULT_SPEC, seed=getattr(args, "seed_weights", None),
                       with_tokenizer=with_tokenizer)
