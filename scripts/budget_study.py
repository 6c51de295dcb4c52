"""When does pretraining pay off? Fine-tuned 3D Dice against the pretraining budget and the unlabelled pool.

Each cell of the study is one ``kpssl experiment`` folder under ``--out``:

    random/            the UNet and KAF-UNet from random initialisation (budget 0), the references
    pool{N}_e{B}/      PCL and KAF pretrained for B epochs on a pool of N unlabelled patients, fine-tuned

The pools are ``--data`` itself (its patients, labels unused) and ``--pool`` (a larger folder of
volumes, e.g. ``kpssl synth --patients 100 --out data/pool100``, whose first 20 patients are the
built-in ones). Fine-tuning and testing always use the folds of ``--data``, with ``finetune.epochs`` set
to ``--finetune-epochs``.

The work is split into units, one ``kpssl experiment`` command per (cell, method, fold), run by
``--workers`` processes at once (one thread each): the references first, then the cells from the
largest budget (pool x epochs) down, each over all folds. A unit that pretrains runs alone for its (cell,
method); the others wait for its encoder. Every unit is restartable (finished runs are skipped, stopped
ones resume), so the script can be killed and run again. It then writes ``--table``: a CSV with one row
per (method, pool, budget, M, fold) and a JSON beside it with the commands, the commit, the summed
training time, the distribution of the chosen epochs and the representation probes of every encoder
and of the random initialisations (:mod:`kpssl.eval.probes`, on every slice of ``--data``).

    python scripts/budget_study.py --data data/synthetic --pool data/pool100 --preset tiny \
        --budgets 3 10 30 --pool-budgets 6 30 --finetune-epochs 120 \
        --out runs/budget_study --table book/results/budget_study
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kpssl.data.layouts import find_cases
from kpssl.train.experiment import PRETRAIN_RESULT_KEYS, code_commit, read_finetune_result, write_rows
from kpssl.train.run import read_json, read_run
from kpssl.atomic import write_json

COLUMNS = ["method", "pool", "pretrain_epochs", "pretrain_steps", "M", "fold", "dice_3d", "dice_2d", "hd95",
           "best_epoch", "epochs", "late_gain", "seconds"]
LATE = 0.9  # the final tenth of the fine-tuning epochs


@dataclass(frozen=True)
class Cell:
    name: str  # folder under --out
    methods: tuple[str, ...]
    pool: int  # patients the pretraining saw (0: none)
    budget: int  # pretraining epochs (0: none)
    pool_dir: Path | None  # --pretrain-data, or None for --data itself


@dataclass(frozen=True)
class Unit:
    cell: Cell
    method: str
    fold: int

    @property
    def name(self) -> str:
        return f"{self.cell.name}-{self.method}-fold{self.fold}"


def patients(folder: Path) -> int:
    return len({case.patient for case in find_cases(folder, "auto", require_labels=False)})


def cells(args: argparse.Namespace) -> list[Cell]:
    pools = [(patients(args.data), None, args.budgets)]
    if args.pool:
        pools.append((patients(args.pool), args.pool, args.pool_budgets or args.budgets))
    found = [Cell("random", tuple(args.references), 0, 0, None)]
    for size, folder, budgets in pools:
        for budget in budgets:
            found.append(Cell(f"pool{size}_e{budget}", tuple(args.methods), size, budget, folder))
    return found


def command(args: argparse.Namespace, unit: Unit) -> list[str]:
    """The ``kpssl experiment`` command of one unit, as the run records it."""
    cell = unit.cell
    words = ["kpssl", "experiment", "--data", str(args.data), "--preset", args.preset,
             "--set", f"finetune.epochs={args.finetune_epochs}"]
    if cell.budget:
        words += ["--set", f"pretrain.epochs={cell.budget}"]
    if cell.pool_dir is not None:
        words += ["--pretrain-data", str(cell.pool_dir)]
    for change in args.set:
        words += ["--set", change]
    return words + ["--methods", unit.method, "--labeled", *map(str, args.labeled), "--folds", str(unit.fold),
                    "--out", str(args.out / cell.name), "--quiet"]


def finished(args: argparse.Namespace, unit: Unit) -> bool:
    base = args.out / unit.cell.name / "finetune" / unit.method
    return all((base / f"M{m}" / f"fold{unit.fold}" / "result.json").is_file() for m in args.labeled)


def encoder_ready(args: argparse.Namespace, unit: Unit) -> bool:
    folder = args.out / unit.cell.name / "pretrain" / unit.method
    return unit.cell.budget == 0 or ((folder / "result.json").is_file() and (folder / "encoder.pt").is_file())


def run_units(args: argparse.Namespace, units: list[Unit]) -> None:
    """Run the unfinished units, ``args.workers`` at a time, never two pretrainings of one encoder."""
    pending = [u for u in units if not finished(args, u)]
    print(f"{len(units) - len(pending)} of {len(units)} units finished; running {len(pending)} "
          f"with {args.workers} workers", flush=True)
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    running: dict[subprocess.Popen, Unit] = {}
    failed: list[str] = []
    while (pending and not failed) or running:
        busy = {(u.cell, u.method) for u in running.values()}
        ready = [u for u in pending if encoder_ready(args, u) or (u.cell, u.method) not in busy]
        while ready and len(running) < args.workers and not failed:
            unit = ready.pop(0)
            pending.remove(unit)
            log = (args.out / "logs" / f"{unit.name}.log").open("a")
            words = command(args, unit)
            process = subprocess.Popen([sys.executable, "-m", "kpssl", *words[1:]], stdout=log, stderr=log,
                                       env=environment)
            running[process] = unit
            busy.add((unit.cell, unit.method))
            ready = [u for u in ready if encoder_ready(args, u) or (u.cell, u.method) not in busy]
            print(f"{time.strftime('%H:%M:%S')} start {unit.name}", flush=True)
        time.sleep(2)
        for process in [p for p in running if p.poll() is not None]:
            unit = running.pop(process)
            state = "done" if process.returncode == 0 else f"FAILED (exit {process.returncode})"
            print(f"{time.strftime('%H:%M:%S')} {state} {unit.name}", flush=True)
            if process.returncode != 0:
                failed.append(f"{unit.name}: see {args.out / 'logs' / (unit.name + '.log')}")
    if failed:
        raise SystemExit("budget study stopped, a unit failed:\n  " + "\n  ".join(failed))


def pretrained(args: argparse.Namespace, cell: Cell, method: str) -> dict | None:
    """The ``result.json`` of the cell's pretraining of ``method`` (steps, seconds), None while unfinished;
    for the references (no pretraining) zero steps and seconds."""
    if not cell.budget:
        return {"steps": 0, "seconds": 0.0}
    path = args.out / cell.name / "pretrain" / method / "result.json"
    return read_json(path, PRETRAIN_RESULT_KEYS) if path.is_file() else None


def rows_of(args: argparse.Namespace, all_cells: list[Cell]) -> list[dict]:
    """One row per finished fine-tuning: the cell's method, pool and budget, M, fold and test scores."""
    rows = []
    for cell in all_cells:
        for method in cell.methods:
            encoder = pretrained(args, cell, method)
            if encoder is None:
                continue
            steps = encoder["steps"]
            for path in sorted((args.out / cell.name / "finetune" / method).glob("M*/fold*/result.json")):
                result = read_finetune_result(path)
                test, epochs = result["test"], result["settings"]["finetune"]["epochs"]
                rows.append({
                    "method": method, "pool": cell.pool, "pretrain_epochs": cell.budget, "pretrain_steps": steps,
                    "M": result["labeled"], "fold": result["fold"], "dice_3d": round(test["dice_3d"], 4),
                    "dice_2d": round(test["dice_2d_pooled"], 4), "hd95": round(test["hd95_mm"], 4),
                    "best_epoch": result["best_epoch"], "epochs": epochs,
                    "late_gain": round(late_gain(path.parent / "log.csv", epochs), 4),
                    "seconds": round(result["seconds"], 1),
                })
    return rows


def late_gain(log: Path, epochs: int) -> float:
    """What the final tenth of a fine-tuning added on the validation patients: the best validation 3D Dice
    of all epochs minus the best of the epochs up to ``LATE * epochs`` (the initialisation, epoch 0,
    included); 0 when the chosen epoch came earlier. Small values mean the run had levelled off even if
    it chose a late epoch."""
    with log.open(newline="") as handle:
        scores = {int(r["epoch"]): float(r["selection_dice"]) for r in csv.DictReader(handle)
                  if r.get("selection_dice") not in (None, "")}
    missing = sorted(set(range(epochs + 1)) - set(scores))
    if missing:
        raise ValueError(f"{log}: no validation Dice for epochs {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    early = max(score for epoch, score in scores.items() if epoch <= LATE * epochs)
    return max(scores.values()) - early


def recorded_commands(args: argparse.Namespace, all_cells: list[Cell]) -> list[str]:
    """Every command the cells' ``run.json`` record, in order, without repeats."""
    seen: dict[str, None] = {}
    for cell in all_cells:
        for entry in (read_run(args.out / cell.name) or {}).get("commands", []):
            seen.setdefault(entry["command"], None)
    return list(seen)


def pretraining_seconds(args: argparse.Namespace, all_cells: list[Cell]) -> float:
    finished = [pretrained(args, c, m) for c in all_cells for m in c.methods]
    return sum(float(r["seconds"]) for r in finished if r is not None)


def chosen_epochs(rows: list[dict]) -> dict:
    """How late the validation patients chose the fine-tuned weights: quartiles and the share at the last epoch."""
    if not rows:
        return {}
    fraction = np.array([r["best_epoch"] / r["epochs"] for r in rows])
    epochs = np.array([r["best_epoch"] for r in rows])
    return {"runs": len(rows), "epoch_quartiles": [float(q) for q in np.percentile(epochs, [0, 25, 50, 75, 100])],
            "last_epoch_share": round(float((fraction == 1).mean()), 4),
            "final_tenth_share": round(float((fraction > LATE).mean()), 4),
            "late_gain_quartiles": [round(float(q), 4) for q in np.percentile([r["late_gain"] for r in rows],
                                                                              [0, 25, 50, 75, 100])]}


def probes(args: argparse.Namespace, all_cells: list[Cell]) -> list[dict]:
    """The representation probes (:mod:`kpssl.eval.probes`) of every finished encoder and of the random
    initialisations, on the centre patches of every slice of ``--data`` (labels unused)."""
    import torch

    from kpssl.cli import _settings
    from kpssl.eval.probes import chance_retrieval_error, probe_batch, probe_encoder

    settings = _settings(argparse.Namespace(preset=args.preset, set=args.set))  # as kpssl experiment reads them
    torch.set_num_threads(args.threads)
    batch, groups = probe_batch(args.data, settings)
    found = [{"method": "chance", "pool": 0, "pretrain_epochs": 0, "pretrain_steps": 0,
              "retrieval_error": round(chance_retrieval_error(batch["position"].double().numpy(), groups), 4)}]
    for cell in all_cells:
        for method in cell.methods:
            result = pretrained(args, cell, method)
            if result is None:
                continue
            encoder = args.out / cell.name / "pretrain" / method / "encoder.pt" if cell.budget else None
            found.append({"method": method, "pool": cell.pool, "pretrain_epochs": cell.budget,
                          "pretrain_steps": result["steps"],
                          **probe_encoder(encoder, method, settings, batch, groups)})
    return found


def export(args: argparse.Namespace, all_cells: list[Cell], folder: Path, command: str) -> list[dict]:
    """Compact copies (:func:`kpssl.train.export.compact_copy`) of the networks the book shows: the UNet
    from random initialisation and the KAF-UNet pretrained with KAF at the largest budget, both fine-tuned
    with the largest M on fold 0, and that KAF encoder itself; ``trained.json`` says what each is."""
    from kpssl.train.export import compact_copy

    m, fold = max(args.labeled), 0
    chosen = [("unet_random", "random", "unet_random", "finetune")] if "unet_random" in args.references else []
    kaf_cells = [c for c in all_cells if "kaf" in c.methods and c.budget]
    if kaf_cells:
        largest = max(kaf_cells, key=lambda c: (c.pool * c.budget, c.pool))
        chosen += [("kaf", largest.name, "kaf", "finetune"), ("kaf_encoder", largest.name, "kaf", "pretrain")]
    written = []
    for name, cell, method, kind in chosen:
        if kind == "finetune":
            run = args.out / cell / "finetune" / method / f"M{m}" / f"fold{fold}"
            source, stem = run / "best.pt", f"{name}_M{m}_fold{fold}"
        else:
            run = args.out / cell / "pretrain" / method
            source, stem = run / "encoder.pt", name
        if not (run / "result.json").is_file():
            print(f"not exported (unfinished): {run}")
            continue
        result = read_json(run / "result.json")
        entry = {"file": f"{stem}.pt", "method": method, "cell": cell, "source": str(source)}
        if kind == "finetune":
            entry |= {"M": m, "fold": fold, "finetune_epochs": result["settings"]["finetune"]["epochs"],
                      "best_epoch": result["best_epoch"],
                      "test_dice_3d": round(result["test"]["dice_3d"], 4)}
        else:
            entry |= {"pretrain_steps": result["steps"]}
        compact_copy(source, folder / entry["file"], note=f"scripts/budget_study.py, cell {cell}")
        written.append(entry)
    write_json(folder / "trained.json", {"command": command, "commit": code_commit(), "networks": written})
    return written


def study_arguments(argv: list[str]) -> list[str]:
    """The arguments that define the study: ``argv`` without those that only collect, annotate or export,
    so that the recorded command recomputes the table from nothing, whichever run of it wrote the file."""
    kept, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == "--collect-only":
            continue
        elif word in ("--note", "--export"):
            skip = True
        elif not word.startswith(("--note=", "--export=")):
            kept.append(word)
    return kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the labelled data (folds, fine-tuning, tests)")
    parser.add_argument("--pool", type=Path, help="a larger unlabelled pool to pretrain on as well")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--methods", nargs="+", default=["pcl", "kaf"])
    parser.add_argument("--references", nargs="+", default=["unet_random", "kaf_random"])
    parser.add_argument("--budgets", nargs="+", type=int, default=[3, 10, 30], help="pretraining epochs")
    parser.add_argument("--pool-budgets", nargs="+", type=int,
                        help="pretraining epochs on --pool (default: --budgets); 6 epochs of 100 patients take "
                             "about as many steps as 30 of 20")
    parser.add_argument("--finetune-epochs", type=int, default=120)
    parser.add_argument("--labeled", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, required=True, help="folder of the cells")
    parser.add_argument("--table", type=Path, required=True, help="stem of the CSV and JSON to write")
    parser.add_argument("--workers", type=int, default=2, help="units run at once")
    parser.add_argument("--threads", type=int, default=1, help="threads per unit")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="another setting for every unit (as kpssl experiment --set)")
    parser.add_argument("--export", type=Path, metavar="DIR",
                        help="also write compact copies of the networks the book shows into DIR")
    parser.add_argument("--collect-only", action="store_true", help="write the table, train nothing")
    parser.add_argument("--note", default="", help="a remark recorded in the JSON")
    args = parser.parse_args(argv)
    if any(b < 1 for b in args.budgets + (args.pool_budgets or [])):
        parser.error("--budgets: pretraining budgets are at least 1 epoch (budget 0 is the 'random' references)")

    given = argv if argv is not None else sys.argv[1:]
    all_cells = cells(args)
    # the references first, then the cells from the largest pretraining budget down, each over all folds:
    # if the study is stopped, what it has finished are whole comparisons, the most telling first
    ordered = sorted(all_cells, key=lambda c: (c.budget > 0, -c.pool * c.budget))
    units = [Unit(c, m, f) for c in ordered for f in args.folds for m in c.methods]
    started = time.perf_counter()
    if not args.collect_only:
        run_units(args, units)
    rows = rows_of(args, all_cells)
    finetuning = sum(r["seconds"] for r in rows)
    pretraining = pretraining_seconds(args, all_cells)
    meta = {
        "command": "python scripts/budget_study.py " + shlex.join(study_arguments(given)),
        "written_by": "python scripts/budget_study.py " + shlex.join(given),
        "runs": recorded_commands(args, all_cells), "preset": args.preset, "commit": code_commit(),
        "finetune_epochs": args.finetune_epochs, "budgets": args.budgets, "pool_budgets": args.pool_budgets or args.budgets, "pools": sorted({c.pool for c in all_cells}),
        "folds": args.folds, "labeled": args.labeled,
        "units": {"planned": len(units), "finished": sum(finished(args, u) for u in units)},
        "seconds_pretraining": round(pretraining, 1), "seconds_finetuning": round(finetuning, 1),
        "seconds_in_runs": round(pretraining + finetuning, 1), "gpu_seconds": 0.0,
        "seconds_this_command": round(time.perf_counter() - started, 1),
        "chosen_epochs": chosen_epochs(rows), "probes": probes(args, all_cells), "note": args.note,
    }
    write_rows(rows, COLUMNS, args.table, meta)
    if args.export:
        export(args, all_cells, args.export, meta["command"])
    print(f"wrote {args.table}.csv ({len(rows)} runs, {meta['seconds_in_runs']:.0f} s of training)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
