"""How long must fine-tuning run? The same runs at several epoch budgets, and the epoch each selected.

Fine-tunes each method at each label budget M on one fold with ``finetune.epochs`` set to each budget
(``kpssl finetune ... --set finetune.epochs=E``), one run folder per combination, then writes a table
with the epoch chosen on the validation patients, its validation Dice and the test scores. A run whose
chosen epoch is the last one was still improving when it stopped.

    python scripts/finetune_epochs.py --data data/synthetic --preset tiny --methods unet_random kaf_random \
        --labeled 1 4 --epochs 30 60 120 --fold 0 --out runs/finetune_epochs --table book/results/tiny_finetune_epochs

Finished runs are kept and skipped when the command is run again; ``--collect-only`` writes the table
from the run folders that exist without training anything.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from kpssl.train.experiment import code_commit, write_rows

COLUMNS = ["method", "M", "fold", "epochs", "best_epoch", "chose_last", "selection_dice_3d", "dice_3d",
           "dice_2d", "hd95", "seconds"]


def run_folder(out: Path, method: str, labelled: int, fold: int, epochs: int) -> Path:
    return out / f"{method}_M{labelled}_fold{fold}_e{epochs}"


def finetune_command(args: argparse.Namespace, method: str, labelled: int, epochs: int) -> list[str]:
    return ["kpssl", "finetune", "--data", str(args.data), "--preset", args.preset, "--method", method,
            "--fold", str(args.fold), "--labeled", str(labelled),
            "--out", str(run_folder(args.out, method, labelled, args.fold, epochs)), "--quiet",
            "--set", f"finetune.epochs={epochs}"]


def row_of(result_path: Path, epochs: int) -> dict:
    result = json.loads(result_path.read_text())
    test = result["test"]
    return {
        "method": result["method"], "M": result["labeled"], "fold": result["fold"], "epochs": epochs,
        "best_epoch": result["best_epoch"], "chose_last": result["best_epoch"] == epochs,
        "selection_dice_3d": round(result["selection_dice_3d"], 4), "dice_3d": round(test["dice_3d"], 4),
        "dice_2d": round(test["dice_2d_pooled"], 4), "hd95": round(test["hd95_mm"], 4),
        "seconds": round(result["seconds"], 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--methods", nargs="+", default=["unet_random", "kaf_random"])
    parser.add_argument("--labeled", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--epochs", nargs="+", type=int, default=[30, 60, 120])
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="folder of the run folders")
    parser.add_argument("--table", type=Path, required=True, help="stem of the CSV and JSON to write")
    parser.add_argument("--collect-only", action="store_true", help="write the table, train nothing")
    parser.add_argument("--note", default="", help="a remark recorded in the JSON (e.g. where the runs came from)")
    args = parser.parse_args(argv)

    rows, commands = [], []
    for epochs in args.epochs:
        for method in args.methods:
            for labelled in args.labeled:
                command = finetune_command(args, method, labelled, epochs)
                result = run_folder(args.out, method, labelled, args.fold, epochs) / "result.json"
                if not result.is_file() and not args.collect_only:
                    subprocess.run([sys.executable, "-m", "kpssl", *command[1:]], check=True)
                if result.is_file():
                    rows.append(row_of(result, epochs))
                    made = json.loads((result.parent / "run.json").read_text())["commands"][0]
                    commands.append(made["command"])  # as recorded by the run itself
    meta = {"command": "python scripts/finetune_epochs.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "runs": commands, "preset": args.preset, "commit": code_commit(),
            "seconds_in_runs": round(sum(r["seconds"] for r in rows), 1), **({"note": args.note} if args.note else {})}
    write_rows(rows, COLUMNS, args.table, meta)
    print(f"{len(rows)} runs in {args.table}.csv; chose their last epoch: "
          f"{sum(r['chose_last'] for r in rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
