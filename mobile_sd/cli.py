"""``mobile-sd`` command line. Every user error prints one line and exits with code 2."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mobile_sd.errors import MobileSDError

DEFAULT_SPEC = "snapfusion"


def _add_model_args(parser: argparse.ArgumentParser) -> None:
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


def cmd_specs(args: argparse.Namespace) -> int:
    from mobile_sd.models.spec import list_specs, load_spec

    for name in list_specs():
        print(f"{name:18s} {load_spec(name).description}")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from mobile_sd.models.folder import write_model_folder
    from mobile_sd.models.zoo import build_model

    model = build_model(args.spec, seed=args.seed_weights)
    write_model_folder(model, args.out, overwrite=args.force)
    print(f"wrote {args.out} ({model.source}). Random weights make noise images; "
          "replace the folder's weights with trained ones (same layout) for real images.")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from mobile_sd.pipeline.recorder import Recorder
    from mobile_sd.pipeline.reference import generate, save_png, validate_generation_args

    if args.model is not None and not args.model.exists():
        from mobile_sd.errors import ModelFolderError
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mobile-sd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("specs", help="list the architecture specs shipped with mobile-sd")
    p.set_defaults(func=cmd_specs)

    p = sub.add_parser("init", help="write a diffusers-style model folder with seeded random weights")
    p.add_argument("--spec", default=DEFAULT_SPEC, help="spec name or path to a spec .yaml")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed-weights", type=int, default=None, help="weight seed (default: the spec's)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("generate", help="run the fp32 PyTorch reference pipeline, write a PNG")
    _add_model_args(p)
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

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands():
    """Sub-commands defined next to their implementation (export, parity, bench)."""
    from mobile_sd.bench.cmd import register as bench
    from mobile_sd.export_cmd import register as export
    from mobile_sd.parity.cmd import register as parity

    return [export, parity, bench]


def _quiet_third_party_logs() -> None:
    """torchao (pulled in by transformers/executorch) logs missing CUDA kernels and torch logs
    pytree deprecations on every import; they say nothing about the user's job."""
    import logging
    import warnings

    for name in ("torchao", "torch.utils._pytree", "transformers.quantizers",
                 "coremltools", "torch._export", "torch.export", "diffusers.quantizers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torch version.*has not been tested.*")


def main(argv: list[str] | None = None) -> int:
    _quiet_third_party_logs()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MobileSDError as exc:
        print(f"mobile-sd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mobile-sd: interrupted; no partial output was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
