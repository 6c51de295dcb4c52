"""The ablations of the paper's Table 2, on the built-in data: KAF levels, T, the loss weights, the radius.

    python scripts/ablation.py --data data/synthetic --preset tiny --labeled 2 --folds 0 1 \
        --out runs/tiny_ablation --table book/results/tiny_ablation

Every variant is the preset with a few settings changed (``kpssl experiment --set KEY=VALUE`` does the
same for one variant) and is fine-tuned on M labelled patients of each fold, exactly as in the main
table. As in the paper, the architecture ablations (which KAF levels, how many attention blocks T) train
the KAF-UNet from a random initialisation (``kaf_random``), and the objective ablations (loss weights,
correspondence radius) pretrain it with ``kaf`` first. The reference rows are the preset itself with
``unet_random`` (no KAF), ``pcl``, ``kaf_random`` and ``kaf``. Each variant has its own folder under
``--out``, so the script can be stopped and restarted; the table (CSV, and JSON with the command, the
commit, each variant's settings and ``seconds_in_runs``, the training time of all its runs summed) is
rewritten atomically after every variant. Each row also lists the test 3D Dice of every fold, so that a
variant can be compared with its reference fold by fold.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from kpssl.settings import load_settings, preset
from kpssl.train.experiment import TABLE_COLUMNS, code_commit, run_experiment, run_seconds, write_rows

LEVELS_OFF = {f"without level {level}": {"model.kaf_levels": [lv != level for lv in range(1, 5)]}
              for level in range(1, 5)}
VARIANTS: dict[str, tuple[str, list[str], dict]] = {
    # name: (group, methods, changed settings)
    "preset": ("reference", ["unet_random", "pcl", "kaf_random", "kaf"], {}),
    **{name: ("KAF levels", ["kaf_random"], change) for name, change in LEVELS_OFF.items()},
    "T = 1": ("attention blocks T", ["kaf_random"], {"model.attention_blocks": 1}),
    "T = 4": ("attention blocks T", ["kaf_random"], {"model.attention_blocks": 4}),
    "weights (1, 0, 0)": ("loss weights", ["kaf"], {"pretrain.loss_weights": [1.0, 0.0, 0.0]}),
    "weights (0, 1, 0)": ("loss weights", ["kaf"], {"pretrain.loss_weights": [0.0, 1.0, 0.0]}),
    "weights (1, 1, 0)": ("loss weights", ["kaf"], {"pretrain.loss_weights": [1.0, 1.0, 0.0]}),
    "radius x 0.5": ("correspondence radius", ["kaf"], {"keypoints.radius_forward": 0.5,
                                                        "keypoints.radius_reverse": 0.5}),
    "radius x 2": ("correspondence radius", ["kaf"], {"keypoints.radius_forward": 2.0,
                                                      "keypoints.radius_reverse": 2.0}),
}
RADIUS_KEYS = ("keypoints.radius_forward", "keypoints.radius_reverse")
COLUMNS = ["variant", "group", "changes", *TABLE_COLUMNS, "fold_ids", "dice_3d_per_fold"]


def folder_name(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def per_fold_dice(folder: Path, method: str, m: int) -> dict[int, float]:
    """Test 3D Dice of every finished fold of one (method, M) of a variant, by fold."""
    found = {}
    for path in (folder / "finetune" / method / f"M{m}").glob("fold*/result.json"):
        found[int(path.parent.name[4:])] = float(json.loads(path.read_text())["test"]["dice_3d"])
    return dict(sorted(found.items()))


def variant_settings(base, changes: dict):
    """The base settings with ``changes``; radius entries are factors of the base radius."""
    concrete = {}
    for key, value in changes.items():
        if key in RADIUS_KEYS:
            group, leaf = key.split(".")
            value = getattr(getattr(base, group), leaf) * value
        concrete[key] = value
    return base.replace(**concrete), concrete


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--settings", help="a settings file instead of the preset")
    parser.add_argument("--labeled", nargs="+", type=int, default=[2])
    parser.add_argument("--folds", nargs="+", type=int, default=[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out", required=True, help="folder for the runs")
    parser.add_argument("--table", required=True, help="table path without suffix (.csv and .json are written)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()

    base = load_settings(args.settings) if args.settings else preset(args.preset)
    meta = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "preset": base.name,
            "commit": code_commit(), "variants": {}}
    started = time.perf_counter()
    rows: list[dict] = []
    seconds_in_runs = 0.0
    for name in args.variants:
        group, methods, changes = VARIANTS[name]
        settings, concrete = variant_settings(base, changes)
        meta["variants"][name] = {"group": group, "methods": methods, "changes": concrete}
        folder = Path(args.out) / folder_name(name)
        variant_rows = run_experiment(settings, args.data, methods, args.labeled, args.folds, folder,
                                      meta={"variant": name, **concrete}, progress=not args.quiet,
                                      command=meta["command"])
        changed = "; ".join(f"{k} = {v}" for k, v in concrete.items())
        for row in variant_rows:
            per_fold = per_fold_dice(folder, row["method"], row["M"])
            rows.append({"variant": name, "group": group, "changes": changed, **row,
                         "fold_ids": " ".join(str(k) for k in per_fold),
                         "dice_3d_per_fold": " ".join(f"{v:.4f}" for v in per_fold.values())})
        seconds_in_runs += run_seconds(folder)
        meta["seconds_in_runs"] = round(seconds_in_runs, 1)
        meta["seconds_this_start"] = round(time.perf_counter() - started, 1)
        write_rows(rows, COLUMNS, Path(args.table), meta)
        print(f"{name}: " + ", ".join(f"{r['method']} M={r['M']} 3D Dice {r['dice_3d_mean']:.3f}"
                                      for r in variant_rows), flush=True)


if __name__ == "__main__":
    main()
