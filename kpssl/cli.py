"""The ``kpssl`` command line: thin wrappers over the library's functions.

Each sub-command imports what it needs when it runs, so ``kpssl check`` starts fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["main", "build_parser"]


def _synth(args: argparse.Namespace) -> int:
    from .data.synthetic import write_synthetic_acdc

    write_synthetic_acdc(Path(args.out), patients=args.patients, seed=args.seed, progress=not args.quiet)
    print(f"wrote {args.patients} synthetic patients (seed {args.seed}) in the ACDC layout to {args.out}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from .data.check import check_folder

    report = check_folder(Path(args.dir))
    for problem in report.problems:
        print(problem, file=sys.stderr)
    print(report.summary())
    return 0 if report.ok else 1


def _keypoints(args: argparse.Namespace) -> int:
    from .keypoints import fill_cache
    from .settings import preset

    settings = preset(args.preset)
    fill_cache(Path(args.dir), settings, progress=not args.quiet)
    return 0


def _summary(args: argparse.Namespace) -> int:
    from .models import format_parameter_summary
    from .settings import preset

    print(format_parameter_summary(preset(args.preset).model))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .settings import PRESETS

    parser = argparse.ArgumentParser(prog="kpssl", description="Keypoint-augmented self-supervised segmentation.")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    sub = command("synth", _synth, "write the built-in synthetic cardiac cine data set in the ACDC layout")
    sub.add_argument("--out", required=True, help="output folder")
    sub.add_argument("--patients", type=int, default=20, help="number of patients (default 20)")
    sub.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    sub.add_argument("--quiet", action="store_true", help="no progress bar")

    sub = command("check", _check, "validate an ACDC-layout or Decathlon-layout data folder")
    sub.add_argument("dir", help="data folder")

    sub = command("keypoints", _keypoints, "detect SIFT keypoints for every slice and fill the cache")
    sub.add_argument("dir", help="data folder")
    sub.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    sub.add_argument("--quiet", action="store_true", help="no progress bar")

    sub = command("summary", _summary, "print the architecture's parameter counts per part")
    sub.add_argument("--preset", default="paper_acdc", choices=sorted(PRESETS))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as error:  # DataError is a ValueError
        print(f"kpssl {args.command}: error: {error}", file=sys.stderr)
        return 2
