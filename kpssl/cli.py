"""The ``kpssl`` command line: thin wrappers over the library's functions.

Each sub-command imports what it needs when it runs, so ``kpssl check`` starts fast.
"""

from __future__ import annotations

import argparse
import os
import shlex
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

    fill_cache(Path(args.dir), _settings(args), progress=not args.quiet)
    return 0


def _summary(args: argparse.Namespace) -> int:
    from .models import format_parameter_summary
    from .settings import preset

    print(format_parameter_summary(preset(args.preset).model))
    return 0


def _settings(args: argparse.Namespace):
    """The preset (or settings file) with every ``--set KEY=VALUE`` applied; values are read as YAML.

    Every value is checked (type, choices, range) before anything runs; a bad one raises
    :class:`~kpssl.settings.SettingsError` naming the setting."""
    import yaml

    from .settings import SettingsError, load_settings, preset

    settings = load_settings(args.settings) if getattr(args, "settings", None) else preset(args.preset)
    changes = {}
    for item in getattr(args, "set", None) or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"--set expects KEY=VALUE (for example model.attention_blocks=4), got {item!r}")
        try:
            changes[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise SettingsError(f"--set {key.strip()}: cannot read the value {text!r} (YAML)") from None
    if not changes:
        return settings
    try:
        return settings.replace(**changes)
    except KeyError as error:
        raise SettingsError(f"--set: {error.args[0]}") from None
    except ValueError as error:
        raise SettingsError(f"--set: {error}") from None


def _command(args: argparse.Namespace) -> str:
    return "kpssl " + shlex.join(args.argv)


def _pretrain(args: argparse.Namespace) -> int:
    from .train.pretrain import pretrain
    from .train.run import check_output_folder

    settings = _settings(args)
    check_output_folder(args.out)
    result = pretrain(settings, Path(args.data), args.method, Path(args.out), resume=args.resume,
                      max_steps=args.max_steps, progress=not args.quiet, allow_change=tuple(args.allow_change or ()),
                      command=_command(args))
    print(f"pretrained {args.method} for {result.steps} steps in {result.seconds:.1f} s: {result.out}/encoder.pt")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from .train.finetune import finetune
    from .train.run import check_output_folder

    settings = _settings(args)
    check_output_folder(args.out)
    if args.encoder and not Path(args.encoder).is_file():
        raise FileNotFoundError(f"--encoder {args.encoder}: file not found (the encoder.pt of a kpssl pretrain run)")
    result = finetune(settings, Path(args.data), args.method, args.fold, args.labeled, Path(args.out),
                      encoder=args.encoder, resume=args.resume, max_epochs=args.max_epochs, progress=not args.quiet,
                      allow_change=tuple(args.allow_change or ()), command=_command(args))
    print(f"{args.method} M={args.labeled} fold {args.fold}: best epoch {result.best_epoch}, test 3D Dice "
          f"{result.test['dice_3d']:.4f}, pooled 2D Dice {result.test['dice_2d_pooled']:.4f}, "
          f"HD95 {result.test['hd95_mm']:.2f} mm ({result.seconds:.1f} s)")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from .atomic import write_json
    from .train.evaluate import evaluate_checkpoint
    from .train.run import RunError, check_output_folder

    if args.out:
        out = Path(args.out)
        if out.is_dir():
            raise RunError(f"--out {out}: is a folder; expected a file name for the JSON "
                           f"(e.g. {out / 'evaluation.json'})")
        check_output_folder(out.parent, "--out")
    summary = evaluate_checkpoint(Path(args.checkpoint), Path(args.data), args.fold, split=args.split)
    text = json.dumps({k: v for k, v in summary.items() if k != "per_volume"}, indent=2)
    if args.out:
        write_json(Path(args.out), summary)
    print(text)
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from .train.experiment import code_commit, run_experiment
    from .train.run import check_output_folder

    settings = _settings(args)
    check_output_folder(args.out)
    meta = {"command": _command(args), "preset": settings.name, "commit": code_commit()}
    rows = run_experiment(settings, Path(args.data), args.methods, args.labeled, args.folds, Path(args.out),
                          pretrain_scope=args.pretrain_scope, pretrain_data=args.pretrain_data, meta=meta,
                          progress=not args.quiet,
                          command=_command(args))
    for row in rows:
        print(f"{row['method']:>12} M={row['M']:<3} 3D Dice {row['dice_3d_mean']:.3f} +- {row['dice_3d_std']:.3f}  "
              f"2D Dice {row['dice_2d_mean']:.3f} +- {row['dice_2d_std']:.3f}  HD95 {row['hd95_mean']:.2f} mm  "
              f"({row['folds']} folds)")
    return 0


def _int_at_least(low: int):
    """An argparse type: a whole number >= ``low``, with a message naming what came."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def build_parser() -> argparse.ArgumentParser:
    from .settings import PRESETS
    from .train.methods import FINETUNE_METHODS, PRETRAIN_METHODS
    from .train.run import SAFE_CHANGES

    parser = argparse.ArgumentParser(prog="kpssl", description="Keypoint-augmented self-supervised segmentation.")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    sub = command("synth", _synth, "write the built-in synthetic cardiac cine data set in the ACDC layout")
    sub.add_argument("--out", required=True, help="output folder")
    sub.add_argument("--patients", type=_positive_int, default=20, help="number of patients (default 20)")
    sub.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default 0)")
    sub.add_argument("--quiet", action="store_true", help="no progress bar")

    sub = command("check", _check, "validate an ACDC-layout or Decathlon-layout data folder")
    sub.add_argument("dir", help="data folder")

    def settings_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
        sub.add_argument("--settings", help="a settings YAML/JSON file (overrides --preset)")
        sub.add_argument("--set", action="append", metavar="KEY=VALUE",
                         help="change one setting, e.g. --set model.attention_blocks=4 or "
                              "--set 'model.kaf_levels=[false, true, true, true]' (repeatable)")
        sub.add_argument("--quiet", action="store_true", help="no progress bar")

    def run_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--data", required=True, help="data folder (ACDC or Decathlon layout, detected)")
        settings_options(sub)

    def resume_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--resume", action="store_true",
                         help="continue a stopped run from its checkpoint (refused if the folder holds another run)")
        sub.add_argument("--allow-change", action="append", metavar="KEY", choices=list(SAFE_CHANGES),
                         help="on --resume, accept a larger value of KEY than the run started with "
                              f"({' or '.join(SAFE_CHANGES)}); recorded in run.json (repeatable)")

    sub = command("keypoints", _keypoints, "detect SIFT keypoints for every slice and fill the cache")
    sub.add_argument("dir", help="data folder")
    settings_options(sub)

    sub = command("pretrain", _pretrain, "self-supervised pretraining of one method")
    run_options(sub)
    sub.add_argument("--method", required=True, choices=PRETRAIN_METHODS)
    sub.add_argument("--out", required=True, help="run folder")
    resume_options(sub)
    sub.add_argument("--max-steps", type=_positive_int, help="stop after this many steps")

    sub = command("finetune", _finetune, "fine-tune on M labelled patients of a fold and evaluate on its test fold")
    run_options(sub)
    sub.add_argument("--method", required=True, choices=FINETUNE_METHODS)
    sub.add_argument("--encoder", help="encoder.pt of a pretraining run (pretrained methods)")
    sub.add_argument("--fold", type=_non_negative_int, default=0)
    sub.add_argument("--labeled", type=_positive_int, required=True, help="M, the number of labelled patients")
    sub.add_argument("--out", required=True, help="run folder")
    resume_options(sub)
    sub.add_argument("--max-epochs", type=_positive_int, help="stop after this many epochs")

    sub = command("evaluate", _evaluate, "evaluate a fine-tuned checkpoint (best.pt) on a fold's patients")
    sub.add_argument("--data", required=True)
    sub.add_argument("--checkpoint", required=True, help="best.pt of a kpssl finetune run")
    sub.add_argument("--fold", type=_non_negative_int, default=0)
    sub.add_argument("--split", default="test", choices=["test", "validation"])
    sub.add_argument("--out", help="write the full JSON (per volume) here")

    sub = command("experiment", _experiment, "the experiment table: methods x label budgets x folds, restartable")
    run_options(sub)
    sub.add_argument("--methods", nargs="+", choices=FINETUNE_METHODS, default=list(FINETUNE_METHODS))
    sub.add_argument("--labeled", nargs="+", type=_positive_int, default=[1, 2, 4])
    sub.add_argument("--folds", nargs="+", type=_non_negative_int, default=[0, 1, 2, 3, 4])
    sub.add_argument("--pretrain-scope", default="all", choices=["all", "train"],
                     help="pretrain on every patient without labels (all, the paper) or per fold without the test fold")
    sub.add_argument("--pretrain-data", help="pretrain on every volume of this folder instead (a larger unlabelled "
                     "pool); fine-tuning keeps the folds of --data")
    sub.add_argument("--out", required=True)

    sub = command("summary", _summary, "print the architecture's parameter counts per part")
    sub.add_argument("--preset", default="paper_acdc", choices=sorted(PRESETS))
    return parser


def _user_error(error: BaseException) -> bool:
    """Whether ``error`` is the user's to fix (bad data, settings, paths, a refused run) rather than a bug.

    The project's error types and file-system errors are; so is a ``ValueError`` raised by kpssl's own
    argument checks (or a ``FloatingPointError`` for a loss that stopped being finite). The same raised
    inside a dependency, and every other exception, is a bug and keeps its traceback."""
    from .data.nifti import DataError
    from .settings import SettingsError

    if isinstance(error, (DataError, SettingsError, OSError)) or type(error).__name__ in ("RunError",
                                                                                          "NonFiniteLossError"):
        return True
    if not isinstance(error, (ValueError, FloatingPointError)):
        return False
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    package = str(Path(__file__).resolve().parent)
    return frame is not None and str(Path(frame.tb_frame.f_code.co_filename).resolve()).startswith(package)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; user errors print ``kpssl: error: ...`` and return 2 (``KPSSL_DEBUG=1`` shows the
    traceback), bugs raise."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("kpssl: interrupted (a run continues from its last checkpoint with --resume)", file=sys.stderr)
        return 130
    except Exception as error:
        if not _user_error(error) or os.environ.get("KPSSL_DEBUG"):
            raise
        print(f"kpssl: error: {error}", file=sys.stderr)
        return 2
