"""``mobile-sd generate``: the fp32 PyTorch reference pipeline, one PNG (and a recording).

Outputs are staged: the PNG and the ``--record`` file are written into hidden temp folders
beside their destinations and renamed into place only when both are complete, so a failure
(disk full, read-only file system, Ctrl-C) leaves neither, nor any temp folder. What generate
replaces: an existing ``--out`` only if it is a PNG image, an existing ``--record`` only if it
is a mobile-sd recording (safetensors with its call index); never a folder, another kind of
file, or anything inside the ``--model`` folder.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import struct
from pathlib import Path

from mobile_sd.commands.common import (add_model_args, load_model_arg, model_folder_arg,
                                      sigterm_as_interrupt)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(8) == PNG_SIGNATURE


def _is_recording(path: Path) -> bool:
    """A safetensors file whose metadata holds a mobile-sd call index."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            return False
        size = struct.unpack("<Q", head)[0]
        if size > 100 << 20:
            return False
        try:
            header = json.loads(handle.read(size))
        except ValueError:
            return False
    return isinstance(header, dict) and "mobile_sd_calls" in (header.get("__metadata__") or {})


def check_outputs(args: argparse.Namespace) -> dict[str, Path]:
    """The files generate will write; refuses anything it must not replace (see module doc)."""
    from mobile_sd.errors import OutputDirError
    from mobile_sd.utils.files import refuse_overlap

    outputs = {"png": args.out} if args.record is None else {"png": args.out, "record": args.record}
    if args.record is not None and args.record.absolute() == args.out.absolute():
        raise OutputDirError(f"--out and --record are the same file {args.out}; give two names")
    kinds = {"png": (_is_png, "a PNG image"), "record": (_is_recording, "a mobile-sd recording")}
    for key, path in outputs.items():
        flag = "--out" if key == "png" else "--record"
        refuse_overlap(path, model_folder_arg(args))
        is_ours, what = kinds[key]
        # a device (/dev/null), fifo or symlink is never ours: os.replace would swap it away
        foreign = path.exists() and not path.is_dir() and not (path.is_file() and is_ours(path))
        if path.is_symlink():
            raise OutputDirError(f"{flag} {path} is a symbolic link; refusing to replace it: "
                                 f"pass the real file or choose another {flag}")
        if foreign:
            raise OutputDirError(f"{flag} {path} exists and is not {what}; generate replaces "
                                 f"only {what}: choose another {flag}")
    return outputs


def _with_latent_size(model, size: int | None):
    from mobile_sd.pipeline.reference import validate_latent_size

    if size is None:
        return model
    validate_latent_size(size, multiple=8)
    unet = dataclasses.replace(model.spec.unet, sample_size=size)
    model.spec = dataclasses.replace(model.spec, unet=unet)
    return model


def cmd_generate(args: argparse.Namespace) -> int:
    from mobile_sd.errors import ModelFolderError
    from mobile_sd.pipeline.recorder import Recorder
    from mobile_sd.pipeline.reference import (generate, save_png, validate_generation_args,
                                              validate_latent_size, validate_seed)
    from mobile_sd.utils.files import WRITE_ERRNOS, output_error, output_lock
    from mobile_sd.utils.staging import staged

    validate_seed(args.seed)
    if args.latent_size is not None:
        validate_latent_size(args.latent_size, multiple=8)
    if args.model is not None and not args.model.exists():
        raise ModelFolderError(f"{args.model}: no such model folder")
    outputs = check_outputs(args)
    model = _with_latent_size(load_model_arg(args), args.latent_size)
    validate_generation_args(args.steps if args.steps is not None else model.spec.scheduler.default_steps,
                             args.guidance if args.guidance is not None else 1.0,
                             model.spec.scheduler)
    recorder = Recorder() if args.record else None
    try:
        with staged(outputs, overwrite=True, prefix=f".{args.out.name}.tmp-") as staging, \
                contextlib.ExitStack() as locks, sigterm_as_interrupt():
            for path in outputs.values():
                locks.enter_context(output_lock(path))
            result = generate(model, args.prompt, args.negative_prompt, args.steps,
                              args.guidance, args.seed, recorder=recorder,
                              progress=not args.quiet)
            save_png(result.image, staging.path("png"))
            if recorder is not None:
                recorder.save(staging.path("record"))
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        in_record = args.record is not None and args.record.name in str(exc.filename or "")
        raise output_error(exc, args.record if in_record else args.out) from None
    if recorder is not None:
        print(f"recorded {len(recorder.calls())} component calls to {args.record}")
    print(f"wrote {args.out} ({result.image.shape[1]}x{result.image.shape[0]}, "
          f"{len(result.timesteps)} steps, model: {model.source})")
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="run the fp32 PyTorch reference pipeline, write a PNG")
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's, 8)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: 4.5)")
    p.add_argument("--seed", type=int, default=0, help="latent noise seed (0..2**64-1)")
    p.add_argument("--latent-size", type=int, default=None,
                   help="latent side (image = 8x), a multiple of 8 up to 256 (default: the "
                   "model's)")
    p.add_argument("--out", type=Path, default=Path("image.png"),
                   help="the PNG to write (replaces only an existing PNG)")
    p.add_argument("--record", type=Path, default=None,
                   help="save every component's inputs/outputs at every step (safetensors)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate, seed_weights=None)
