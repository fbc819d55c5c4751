"""``mobile-sd specs`` and ``mobile-sd init``: the shipped architectures, and a model folder
with seeded random weights."""
from __future__ import annotations

import argparse
from pathlib import Path

from mobile_sd.commands.common import DEFAULT_SPEC


def cmd_specs(args: argparse.Namespace) -> int:
    from mobile_sd.models.spec import list_specs, load_spec

    for name in list_specs():
        print(f"{name:18s} {load_spec(name).description}")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from mobile_sd.models.folder import write_model_folder
    from mobile_sd.models.zoo import build_model
    from mobile_sd.utils.files import check_replaceable

    check_replaceable(args.out, args.force, "model")  # before the weights are built
    model = build_model(args.spec, seed=args.seed_weights)
    write_model_folder(model, args.out, overwrite=args.force)
    print(f"wrote {args.out} ({model.source}). Random weights make noise images; "
          "replace the folder's weights with trained ones (same layout) for real images.")
    return 0


def register(sub) -> None:
    p = sub.add_parser("specs", help="list the architecture specs shipped with mobile-sd")
    p.set_defaults(func=cmd_specs)

    p = sub.add_parser("init", help="write a diffusers-style model folder with seeded random weights")
    p.add_argument("--spec", default=DEFAULT_SPEC, help="spec name or path to a spec .yaml")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed-weights", type=int, default=None, help="weight seed (default: the spec's)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out written by `mobile-sd init` (its "
                   "model_index.json); anything else is refused, never deleted")
    p.set_defaults(func=cmd_init)
