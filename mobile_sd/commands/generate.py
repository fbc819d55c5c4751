"""``mobile-sd generate``: the fp32 PyTorch reference pipeline, one PNG (and a recording)."""
from __future__ import annotations

import argparse
from pathlib import Path

from mobile_sd.commands.common import add_model_args, load_model_arg


def cmd_generate(args: argparse.Namespace) -> int:
    from mobile_sd.errors import ModelFolderError
    from mobile_sd.pipeline.recorder import Recorder
    from mobile_sd.pipeline.reference import generate, save_png, validate_generation_args

    if args.model is not None and not args.model.exists():
        raise ModelFolderError(f"{args.model}: no such model folder")
    model = load_model_arg(args)
    validate_generation_args(args.steps if args.steps is not None else model.spec.scheduler.default_steps,
                             args.guidance if args.guidance is not None else 1.0,
                             model.spec.scheduler)
    recorder = Recorder() if args.record else None
    result = generate(model, args.prompt, args.negative_prompt, args.steps, args.guidance,
                      args.seed, recorder=recorder, progress=not args.quiet)
    save_png(result.image, args.out)
    if recorder is not None:
        recorder.save(args.record)
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
    p.add_argument("--seed", type=int, default=0, help="latent noise seed")
    p.add_argument("--out", type=Path, default=Path("image.png"))
    p.add_argument("--record", type=Path, default=None,
                   help="save every component's inputs/outputs at every step (safetensors)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate, seed_weights=None)
