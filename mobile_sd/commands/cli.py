"""``mobile-sd`` command line. Every user error prints one line and exits with code 2.

The commands live beside this module (one file each, argparse only); nothing imports
``mobile_sd.commands``: it imports everything else.
"""
from __future__ import annotations

import argparse
import sys

from mobile_sd.errors import MobileSDError


class OneLineParser(argparse.ArgumentParser):
    """argparse's errors (``--steps nan``, a missing option) as one line, exit code 2, like
    every other user error; argparse would print the whole usage first."""

    def error(self, message: str):
        self.exit(2, f"mobile-sd: error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from mobile_sd.commands import bench, export, generate, models, parity

    parser = OneLineParser(prog="mobile-sd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (models, generate, export, parity, bench):
        command.register(sub)
    return parser


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
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, one line already printed)
        return exc.code if isinstance(exc.code, int) else 2
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
