"""``mobile-sd export --recipe R.yaml [--model DIR | --spec NAME] --out DIR``."""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from mobile_sd.commands.common import (add_model_args, load_model_arg, model_folder_arg,
                                      sigterm_as_interrupt)


def _recipe_from_args(args: argparse.Namespace):
    """The recipe file with the command line's overrides (latent size, components)."""
    from mobile_sd.errors import RecipeError
    from mobile_sd.names import COMPONENT_NAMES, check_component_names
    from mobile_sd.recipes import ComponentRecipe, load_recipe

    recipe = load_recipe(args.recipe)
    if args.latent_size is not None:
        from mobile_sd.pipeline.reference import validate_latent_size

        validate_latent_size(args.latent_size)
        try:
            recipe = dataclasses.replace(recipe, latent_size=args.latent_size)
        except ValueError as exc:  # Recipe.__post_init__ validation
            raise RecipeError(f"--latent-size: {exc}") from exc
    if getattr(args, "soc", None):
        recipe = _with_soc(recipe, args.soc)
    if args.components:
        check_component_names(args.components, "--components", RecipeError)
        comps = {n: dataclasses.replace(recipe.components.get(n, ComponentRecipe()),
                                        export=n in args.components)
                 for n in COMPONENT_NAMES}
        recipe = dataclasses.replace(recipe, components=comps)
    return recipe


def _with_soc(recipe, soc: str):
    """``--soc``: the Snapdragon part of a ``format: qnn`` recipe (checked like the file's)."""
    from mobile_sd.errors import RecipeError

    if recipe.format != "qnn":
        raise RecipeError(f"--soc applies to format 'qnn' recipes; {recipe.name} is "
                          f"format {recipe.format!r}")
    try:
        return dataclasses.replace(recipe, options=dataclasses.replace(recipe.options,
                                                                       soc=soc.upper()))
    except ValueError as exc:  # Recipe.__post_init__ validation
        raise RecipeError(f"--soc: {exc}") from exc


def cmd_export(args: argparse.Namespace) -> int:
    from mobile_sd.errors import ExportInterruptedError
    from mobile_sd.export.engine import run_export
    from mobile_sd.utils.env import peak_rss_mb
    from mobile_sd.utils.files import check_replaceable, refuse_overlap

    refuse_overlap(args.out, model_folder_arg(args))  # before anything is loaded or written
    check_replaceable(args.out, args.force, "export")
    recipe = _recipe_from_args(args)
    start = time.perf_counter()
    model = load_model_arg(args)
    try:
        with sigterm_as_interrupt():
            manifest = run_export(recipe, model, args.out, overwrite=args.force)
    except KeyboardInterrupt:
        # atomic_output_dir already removed the temp folder; say so with exit code 2.
        raise ExportInterruptedError(f"export interrupted; nothing was written: {args.out} is "
                                     "as it was before. Run the command again") from None
    for name, comp in manifest.components.items():
        size = sum(f.bytes for f in comp.files) / 2**20
        print(f"{name:13s} {size:9.1f} MB  {', '.join(f.path for f in comp.files)}")
    for skip in manifest.skipped:
        print(f"skipped: {skip['step']}: {skip['reason']}")
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s, peak RSS "
          f"{peak_rss_mb() / 1024:.1f} GB (model: {model.source})")
    return 0


def register(sub) -> None:
    p = sub.add_parser("export", help="export components per a recipe (Core ML, ExecuTorch, ONNX)")
    p.add_argument("--recipe", type=Path, required=True, help="export_recipes/*.yaml")
    add_model_args(p)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--latent-size", type=int, default=None, help="override the recipe's latent size")
    p.add_argument("--components", nargs="+", default=None,
                   help="export only these components (text_encoder unet decoder)")
    p.add_argument("--soc", default=None,
                   help="format 'qnn': Snapdragon part to compile for (SM8550, SM8650, SM8750)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out written by `mobile-sd export` (its "
                   "manifest.json); anything else is refused, never deleted")
    p.set_defaults(func=cmd_export, seed_weights=None)
