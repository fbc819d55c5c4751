"""``mobile-sd parity ARTIFACT_DIR [--model DIR | --spec NAME]``.

Exit codes: 0 every check that could run here passed (skips are listed, never counted as
passes), 1 a gate failed, 2 an error (no manifest, sha256 mismatch, I/O differs from the
manifest, bad arguments). ``--fail-on-skip`` turns "nothing could run here" into exit 1.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from mobile_sd.commands.common import add_model_args, load_model_arg


def _reference_model(args: argparse.Namespace, manifest: dict):
    """--model / --spec, else the model the manifest says the export was made from."""
    from mobile_sd.errors import ParityError

    if args.model is None and args.spec is None:
        model_info = manifest.model
        source = str(model_info.get("source", ""))
        if source.startswith("spec ") and model_info.get("spec"):
            args.spec = model_info["spec"]
        elif source and Path(source).is_dir():
            args.model = Path(source)
        else:
            raise ParityError(f"manifest.json does not say which model was exported "
                              f"(source {source!r}); pass --model DIR or --spec NAME")
    return load_model_arg(args)


def cmd_parity(args: argparse.Namespace) -> int:
    from mobile_sd.errors import InvalidArgumentError
    from mobile_sd.manifest import load_manifest
    from mobile_sd.parity.report import terminal_lines
    from mobile_sd.parity.run import ParityOptions, run_parity

    if args.random_inputs < 0 or (args.threads is not None and args.threads < 1):
        raise InvalidArgumentError("--random-inputs must be >= 0 and --threads >= 1")
    if not args.prompts or any(not p.strip() for p in args.prompts):
        raise InvalidArgumentError("--prompts needs at least one non-empty prompt")
    manifest = load_manifest(args.artifact_dir)  # fail fast, before loading the model
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)  # the eager references too, not only the runtime
    model = _reference_model(args, manifest)
    options = ParityOptions(prompts=tuple(args.prompts), seed=args.seed,
                            random_inputs=args.random_inputs, components=args.components,
                            e2e=not args.no_e2e, locate=not args.no_locate,
                            num_threads=args.threads, progress=not args.quiet,
                            coreml_mode=args.coreml_mode)
    report = run_parity(args.artifact_dir, model, options, args.out)
    for line in terminal_lines(report):
        print(line)
    status = report["summary"]["status"]
    return 1 if status == "fail" or (status == "skip" and args.fail_on_skip) else 0


def register(sub) -> None:
    from mobile_sd.recipes import DEFAULT_PROMPTS

    p = sub.add_parser("parity", help="check an export folder's artifacts against fp32 PyTorch "
                       "(per component, end to end, with a divergence locator)")
    p.add_argument("artifact_dir", type=Path, help="a folder written by `mobile-sd export`")
    add_model_args(p)
    p.add_argument("--prompts", nargs="+", default=list(DEFAULT_PROMPTS[:2]),
                   help="prompts for the real pipeline inputs and the end-to-end images")
    p.add_argument("--seed", type=int, default=0, help="latent noise seed of the first prompt")
    p.add_argument("--random-inputs", type=int, default=2, help="random input sets per component")
    p.add_argument("--components", nargs="+", default=None,
                   help="check only these components (others run eagerly end to end)")
    p.add_argument("--out", type=Path, default=None,
                   help="report folder (default: ARTIFACT_DIR.parity beside the export)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for the runtimes and eager PyTorch")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end pipeline run")
    p.add_argument("--no-locate", action="store_true", help="do not locate divergences")
    p.add_argument("--fail-on-skip", action="store_true",
                   help="exit 1 when nothing could run on this host")
    p.add_argument("--coreml-mode", choices=("typed", "fp32"), default="typed",
                   help="Core ML off macOS (MIL runtime): 'typed' keeps the program's fp16 "
                   "tensors fp16 as shipped; 'fp32' widens them, to tell conversion error "
                   "from fp16 loss")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_parity, seed_weights=None)
