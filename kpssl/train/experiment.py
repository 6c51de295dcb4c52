"""The experiment table: every method at every label budget M over folds, restartable.

    kpssl experiment --data DIR --preset tiny --methods unet_random kaf_random simclr gcl pcl kaf \
        --labeled 1 2 4 --folds 0 1 2 3 4 --out runs/table

Layout under ``out``::

    pretrain/METHOD/[foldK/]   one pretraining per method (per fold with ``--pretrain-scope train``)
    finetune/METHOD/M{m}/fold{k}/result.json
    table.csv, table.json      mean and standard deviation over folds, rewritten after every run

Pretraining reads every volume under ``--data`` without its labels, or under ``--pretrain-data`` when
given: a larger unlabelled pool (for example ``kpssl synth --patients 100``, whose first 20 patients are
the built-in ones), while fine-tuning and testing keep the folds of ``--data``.

A run whose ``result.json`` exists is skipped, an unfinished one resumes from its checkpoint, and the
table is written atomically, so the command can be killed and restarted at any point.

Every run folder records its identity (``run.json``, :mod:`kpssl.train.run`), and so does ``out`` itself:
the data, the pretraining scope and the settings of the table. Before anything trains, the whole folder
is checked: a rerun into the same ``out`` with other settings or data, a finished run made with other
settings, or a truncated or empty ``result.json`` is refused with a message naming the file and what
differs. A table therefore never mixes runs of different settings, and ``table.json`` lists every
command that contributed to it.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..atomic import atomic_write
from ..data.layouts import Case, find_cases
from ..data.slices import load_volumes
from ..data.splits import fold_split
from ..settings import Settings
from .finetune import finetune
from .methods import FINETUNE_METHODS, PRETRAIN_METHODS, PRETRAINED
from .pretrain import pretrain
from .run import (
    RUN_FILE, RunError, RunIdentity, check_output_folder, code_version, data_fingerprint, describe_differences,
    identity_differences,
    legacy_identity, read_json, read_run, relevant_settings, remove_stale_temporaries, write_json,
)

__all__ = ["TABLE_COLUMNS", "run_experiment", "validate_experiment_folder", "collect_table", "write_table",
           "write_rows", "run_seconds", "code_commit"]

TABLE_COLUMNS = ["method", "M", "dice_3d_mean", "dice_3d_std", "dice_2d_mean", "dice_2d_std", "hd95_mean",
                 "hd95_std", "folds"]
FINETUNE_RESULT_KEYS = ("method", "fold", "labeled", "test", "seconds")
TEST_KEYS = ("dice_3d", "dice_2d_pooled", "hd95_mm")
PRETRAIN_RESULT_KEYS = ("method", "steps", "seconds")


def read_finetune_result(path: Path) -> dict:
    """A fine-tuning ``result.json``, checked to be complete; :class:`RunError` names the file if not."""
    result = read_json(path, FINETUNE_RESULT_KEYS)
    if not isinstance(result["test"], dict) or any(k not in result["test"] for k in TEST_KEYS):
        raise RunError(f"{path}: incomplete, its 'test' lacks {', '.join(TEST_KEYS)}; delete the file "
                       "(its run will be redone) or the folder")
    return result


def _pretrain_cases(cases: list[Case], settings: Settings, fold: int, scope: str) -> list[Case]:
    """The cases a pretraining sees: all of them, or (scope ``train``) all but the test fold's patients."""
    if scope != "train":
        return cases
    split = fold_split(sorted({c.patient for c in cases}), fold, settings.splits)
    return [c for c in cases if c.patient not in set(split.test)]


def _pretrain_folder(out: Path, method: str, fold: int, scope: str) -> Path:
    return out / "pretrain" / method / (f"fold{fold}" if scope == "train" else "")


def _pretrained_encoder(settings: Settings, data: Path, method: str, fold: int, out: Path, scope: str,
                        progress: bool, unlabelled: list[Case], command: str | None) -> Path:
    folder = _pretrain_folder(out, method, fold, scope)
    encoder = folder / "encoder.pt"
    if (folder / "result.json").is_file() and encoder.is_file():
        return encoder
    volumes = None
    if scope == "train":  # leave the test fold's patients out even without their labels
        volumes = load_volumes(_pretrain_cases(unlabelled, settings, fold, scope), settings.data, labels=False)
    pretrain(settings, data, method, folder, resume=(folder / "checkpoint.pt").is_file(), progress=progress,
             volumes=volumes, command=command)
    return encoder


def _folder_problems(folder: Path, wanted: RunIdentity, result_keys: Sequence[str]) -> str | None:
    """Why the run folder ``folder`` cannot serve as the run ``wanted`` (ignoring the encoder), or None.

    An unreadable or incomplete ``result.json`` or ``run.json`` is a problem too (its message)."""
    try:
        if (folder / "result.json").exists():
            if wanted.kind == "finetune":
                read_finetune_result(folder / "result.json")
            else:
                read_json(folder / "result.json", result_keys)
        record = read_run(folder)
        stored = record["identity"] if record else legacy_identity(folder)
        if stored is None:
            return None
        differences = identity_differences(stored, wanted)
    except (RunError, ValueError) as error:
        return str(error)
    differences.pop("encoder", None)  # checked when the run resumes; the pretraining may not exist yet
    if not differences:
        return None
    return f"{folder / RUN_FILE if record else folder}: made with {describe_differences(differences)}"


def validate_experiment_folder(out: Path, settings: Settings, data: Path, cases: list[Case],
                               unlabelled: list[Case], scope: str, pool: Path | None = None) -> None:
    """Check every run folder under ``out`` against this experiment before anything trains.

    Raises :class:`RunError` naming each unreadable or incomplete ``result.json`` and each run made with
    other data or settings (``stored -> wanted``), so nothing trains on a folder that cannot give a
    consistent table."""
    problems = []
    for folder in sorted((out / "finetune").glob("*/M*/fold*")):
        method, budget, fold = folder.parent.parent.name, folder.parent.name[1:], folder.name[4:]
        if not folder.is_dir() or method not in FINETUNE_METHODS or not budget.isdigit() or not fold.isdigit():
            continue
        wanted = RunIdentity.of("finetune", method, settings, cases, data, fold=int(fold), labeled=int(budget))
        problem = _folder_problems(folder, wanted, FINETUNE_RESULT_KEYS)
        if problem:
            problems.append(problem)
    for method in PRETRAIN_METHODS:
        folds = sorted(p.name[4:] for p in (out / "pretrain" / method).glob("fold*") if p.name[4:].isdigit())
        for fold in ([int(f) for f in folds] if scope == "train" else [0]):
            folder = _pretrain_folder(out, method, fold, scope)
            if not folder.is_dir():
                continue
            wanted = RunIdentity.of("pretrain", method, settings, _pretrain_cases(unlabelled, settings, fold, scope),
                                    data if pool is None else pool)
            problem = _folder_problems(folder, wanted, PRETRAIN_RESULT_KEYS)
            if problem:
                problems.append(problem)
    if problems:
        shown = "\n  ".join(problems[:8]) + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise RunError(f"{out}: holds runs this experiment cannot use (nothing was trained):\n  {shown}\n"
                       "Choose another --out for other settings or data, or delete the runs named.")


def _claim_experiment(out: Path, identity: RunIdentity, command: str | None, settings: Settings) -> dict:
    """Record this command in ``out/run.json``; refuse if ``out`` holds a table of other settings or data."""
    check_output_folder(out)
    record = read_run(out) if out.is_dir() else None
    if record is not None:
        differences = identity_differences(record["identity"], identity)
        if differences:
            raise RunError(f"{out / RUN_FILE}: this folder holds a table made with "
                           f"{describe_differences(differences)}. Choose another --out for other settings or data "
                           "(nothing was trained)")
    entry = {"command": command or "python API", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "code": code_version()}
    record = {"identity": identity.to_dict(), "settings": settings.to_dict(),
              "commands": [*(record or {}).get("commands", []), entry]}
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # of table.csv, table.json, run.json
    write_json(out / RUN_FILE, record)
    return record


def collect_table(out: Path) -> list[dict]:
    """Mean and standard deviation over folds of every finished (method, M).

    The rows of one (method, M) must come from runs of one identity: any setting the runs share (a run
    made before a setting existed simply lacks it) and the data fingerprint must agree, or the table is
    refused naming the files."""
    rows = []
    by_key: dict[tuple[str, int], list[dict]] = {}
    first: dict[tuple[str, int], tuple[Path, dict]] = {}
    for path in sorted((out / "finetune").glob("*/M*/fold*/result.json")):
        result = read_finetune_result(path)
        key = (result["method"], int(result["labeled"]))
        by_key.setdefault(key, []).append(result["test"])
        keys = relevant_settings("finetune", result.get("settings") or {})
        if result.get("data"):
            keys["data"] = result["data"]
        reference_path, reference = first.setdefault(key, (path, keys))
        differing = sorted(k for k in keys.keys() & reference.keys() if keys[k] != reference[k])
        if differing:
            raise RunError(f"{path}: made with other settings or data than {reference_path} (differing: "
                           f"{', '.join(differing[:6])}); runs of one table row must share them")
    order = {m: i for i, m in enumerate(FINETUNE_METHODS)}
    for (method, m), tests in sorted(by_key.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1])):
        row: dict = {"method": method, "M": m, "folds": len(tests)}
        for name, key in (("dice_3d", "dice_3d"), ("dice_2d", "dice_2d_pooled"), ("hd95", "hd95_mm")):
            values = np.array([t[key] for t in tests], float)
            values = values[np.isfinite(values)]
            row[f"{name}_mean"] = round(float(values.mean()), 4) if values.size else float("nan")
            row[f"{name}_std"] = round(float(values.std(ddof=1)), 4) if values.size > 1 else 0.0
        rows.append(row)
    return rows


def run_seconds(out: Path) -> float:
    """Total training time recorded by every finished pretraining and fine-tuning run under ``out``: the
    table's cost, whatever the number of restarts or processes that computed it."""
    files = [*(out / "pretrain").glob("**/result.json"), *(out / "finetune").glob("*/M*/fold*/result.json")]
    return round(sum(float(read_json(f).get("seconds", 0.0)) for f in files), 1)


def write_table(rows: list[dict], out: Path, meta: dict) -> None:
    """``table.csv`` and ``table.json`` (with ``meta``: command, preset, commit, run time), atomically.

    The JSON's ``seconds_in_runs`` is :func:`run_seconds`, the sum over all finished runs."""
    write_rows(rows, TABLE_COLUMNS, out / "table", {**meta, "seconds_in_runs": run_seconds(out)})


def write_rows(rows: list[dict], columns: list[str], stem: Path, meta: dict) -> None:
    """``rows`` as ``stem.csv`` (``columns``) and ``stem.json`` (``meta`` with the rows), each written
    atomically (:func:`kpssl.atomic.atomic_write`), so readers and other processes never see a partial file."""

    def write_csv(tmp: Path) -> None:
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, columns)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(stem.with_name(f"{stem.name}.csv"), write_csv)
    write_json(stem.with_name(f"{stem.name}.json"), {**meta, "rows": rows})


def code_commit() -> str:
    """The git commit of the checkout the package runs from, or ``"unknown"`` outside one."""
    return code_version()["commit"]


def run_experiment(
    settings: Settings,
    data: str | Path,
    methods: Sequence[str],
    labelled: Sequence[int],
    folds: Sequence[int],
    out: str | Path,
    *,
    pretrain_scope: str = "all",
    pretrain_data: str | Path | None = None,
    meta: dict | None = None,
    progress: bool = True,
    command: str | None = None,
) -> list[dict]:
    """Pretrain as needed, fine-tune every (method, M, fold), evaluate, and keep the table current.

    ``pretrain_scope``: ``"all"`` pretrains once per method on every patient without labels (the
    paper's protocol); ``"train"`` pretrains once per method and fold without the test fold's patients.
    ``pretrain_data``: another folder whose volumes (all of them, labels unused) the pretrainings read
    instead of ``data``'s, for a larger unlabelled pool; only with scope ``"all"``.
    Everything is checked before the first run trains (methods, folds, budgets, and every run folder
    already under ``out``, :func:`validate_experiment_folder`); ``command`` is recorded in ``out/run.json``
    and the table's JSON lists every command that contributed (``commands``).
    """
    data, out = Path(data), Path(out)
    pool = data if pretrain_data is None else Path(pretrain_data)
    cases, unlabelled = _check_experiment(settings, data, methods, labelled, folds, out, pretrain_scope, pool)
    extra = {"pretrain_scope": pretrain_scope}
    if pool != data:  # a table pretrained on another pool is another table
        extra["pretrain_data"] = data_fingerprint(unlabelled, pool)
    identity = RunIdentity.of("experiment", "table", settings, cases, data, extra=extra)
    record = _claim_experiment(out, identity, command, settings)
    table = _TableWriter(out, {**(meta or {}), "commands": [entry["command"] for entry in record["commands"]],
                               "settings_hash": identity.settings_hash, "data": identity.data})
    for fold in folds:  # fold by fold, so a stopped run leaves every method with the same folds done
        for method in methods:
            encoder = None
            if method in PRETRAINED:
                encoder = _pretrained_encoder(settings, pool, method, fold, out, pretrain_scope, progress,
                                              unlabelled, command)
            for m in labelled:
                folder = out / "finetune" / method / f"M{m}" / f"fold{fold}"
                if (folder / "result.json").is_file():
                    continue
                finetune(settings, data, method, fold, m, folder, encoder=encoder,
                         resume=(folder / "checkpoint.pt").is_file(), progress=progress, command=command)
                table.update()
    return table.update()


def _check_experiment(settings: Settings, data: Path, methods: Sequence[str], labelled: Sequence[int],
                      folds: Sequence[int], out: Path, pretrain_scope: str,
                      pool: Path) -> tuple[list[Case], list[Case]]:
    """Everything that can refuse an experiment, before any time is spent: the methods, the scope, the
    pretraining pool, the output folder, every fold and budget, and the runs already under ``out``.
    Returns the labelled cases under ``data`` and the unlabelled ones under ``pool``."""
    unknown = [m for m in methods if m not in FINETUNE_METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; expected {', '.join(FINETUNE_METHODS)}")
    if pretrain_scope not in ("all", "train"):
        raise ValueError(f"pretrain_scope must be 'all' or 'train', got {pretrain_scope!r}")
    if pool != data and pretrain_scope != "all":
        raise ValueError(f"{pool}: a separate pretraining pool needs pretrain_scope 'all' (its patients cannot "
                         "be matched to the folds of the labelled data)")
    check_output_folder(out)
    cases = find_cases(data, settings.data.layout)
    unlabelled = find_cases(pool, settings.data.layout, require_labels=False)
    patients = sorted({c.patient for c in cases})
    for fold in folds:
        split = fold_split(patients, fold, settings.splits)
        too_many = [m for m in labelled if m > len(split.train)]
        if too_many:
            raise ValueError(f"M = {too_many[0]} labelled patients requested but fold {fold} has only "
                             f"{len(split.train)} training patients")
    validate_experiment_folder(out, settings, data, cases, unlabelled, pretrain_scope, pool)
    return cases, unlabelled


class _TableWriter:
    """Rewrites ``table.csv`` and ``table.json`` from the finished runs under ``out`` (:func:`collect_table`),
    with ``meta`` and the time this command has run so far."""

    def __init__(self, out: Path, meta: dict):
        self.out, self.meta = out, meta
        self.started = time.perf_counter()

    def update(self) -> list[dict]:
        rows = collect_table(self.out)
        write_table(rows, self.out, {**self.meta, "seconds_this_session": round(time.perf_counter() - self.started, 1)})
        return rows
