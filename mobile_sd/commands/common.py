"""Arguments shared by several commands: which model (``--model DIR [--variant NAME]`` or
``--spec NAME``)."""
from __future__ import annotations

import argparse
import contextlib
import signal
import threading
from pathlib import Path

DEFAULT_SPEC = "snapfusion"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--model", type=Path, help="a diffusers-style model folder (trained weights)")
    group.add_argument("--spec", help=f"an architecture spec name or .yaml, built with seeded "
                       f"random weights (default: {DEFAULT_SPEC})")
    parser.add_argument("--variant", default=None,
                        help="with --model: load the NAME weight files (e.g. fp16 reads "
                        "*.fp16.safetensors)")


def load_model_arg(args: argparse.Namespace, with_tokenizer: bool = True):
    """The model chosen by ``--model DIR`` or ``--spec NAME`` (random weights)."""
    from mobile_sd.errors import InvalidArgumentError
    from mobile_sd.models.folder import load_model_folder
    from mobile_sd.models.zoo import build_model

    variant = getattr(args, "variant", None)
    if getattr(args, "model", None) is not None:
        return load_model_folder(args.model, variant=variant)
    if variant is not None:
        raise InvalidArgumentError("--variant selects weight files of a --model folder; a "
                                   "--spec builds random weights: drop --variant or pass --model")
    return build_model(args.spec or DEFAULT_SPEC, seed=getattr(args, "seed_weights", None),
                       with_tokenizer=with_tokenizer)


def model_folder_arg(args: argparse.Namespace) -> Path | None:
    """The ``--model`` folder (outputs must stay out of it), None with ``--spec``."""
    return getattr(args, "model", None)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Treat SIGTERM (``kill``, CI timeouts, ``make`` being stopped) like Ctrl-C while the
    command writes, so its temp files are removed too; the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
