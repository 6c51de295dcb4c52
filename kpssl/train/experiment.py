"""The experiment table: every method at every label budget M over folds, restartable.

    kpssl experiment --data DIR --preset tiny --methods unet_random kaf_random simclr gcl pcl kaf \
        --labeled 1 2 4 --folds 0 1 2 3 4 --out runs/table

Layout under ``out``::

    pretrain/METHOD/[foldK/]   one pretraining per method (per fold with ``--pretrain-scope train``)
    finetune/METHOD/M{m}/fold{k}/result.json
    table.csv, table.json      mean and standard deviation over folds, rewritten after every run

A run whose ``result.json`` exists is skipped, an unfinished one resumes from its checkpoint, and the
table is written atomically, so the command can be killed and restarted at any point.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.layouts import find_cases
from ..data.slices import load_volumes
from ..data.splits import fold_split
from ..settings import Settings
from .finetune import FINETUNE_METHODS, PRETRAINED, finetune
from .pretrain import pretrain

__all__ = ["TABLE_COLUMNS", "run_experiment", "collect_table", "write_table", "write_rows", "run_seconds",
           "code_commit"]

TABLE_COLUMNS = ["method", "M", "dice_3d_mean", "dice_3d_std", "dice_2d_mean", "dice_2d_std", "hd95_mean",
                 "hd95_std", "folds"]


def _pretrained_encoder(settings: Settings, data: Path, method: str, fold: int, out: Path, scope: str,
                        progress: bool) -> Path:
    folder = out / "pretrain" / method / (f"fold{fold}" if scope == "train" else "")
    encoder = folder / "encoder.pt"
    if (folder / "result.json").is_file() and encoder.is_file():
        return encoder
    volumes = None
    if scope == "train":  # leave the test fold's patients out even without their labels
        cases = find_cases(data, settings.data.layout, require_labels=False)
        split = fold_split(sorted({c.patient for c in cases}), fold, settings.splits)
        keep = [c for c in cases if c.patient not in set(split.test)]
        volumes = load_volumes(keep, settings.data, labels=False)
    pretrain(settings, data, method, folder, resume=(folder / "checkpoint.pt").is_file(), progress=progress,
             volumes=volumes)
    return encoder


def collect_table(out: Path) -> list[dict]:
    """Mean and standard deviation over folds of every finished (method, M)."""
    rows = []
    by_key: dict[tuple[str, int], list[dict]] = {}
    for path in sorted((out / "finetune").glob("*/M*/fold*/result.json")):
        result = json.loads(path.read_text())
        by_key.setdefault((result["method"], int(result["labeled"])), []).append(result["test"])
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
    return round(sum(float(json.loads(f.read_text()).get("seconds", 0.0)) for f in files), 1)


def write_table(rows: list[dict], out: Path, meta: dict) -> None:
    """``table.csv`` and ``table.json`` (with ``meta``: command, preset, commit, run time), atomically.

    The JSON's ``seconds_in_runs`` is :func:`run_seconds`, the sum over all finished runs."""
    write_rows(rows, TABLE_COLUMNS, out / "table", {**meta, "seconds_in_runs": run_seconds(out)})


def write_rows(rows: list[dict], columns: list[str], stem: Path, meta: dict) -> None:
    """``rows`` as ``stem.csv`` (``columns``) and ``stem.json`` (``meta`` with the rows), each written to a
    temporary file of this process and renamed, so readers and other processes never see a partial file."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    tmp = stem.with_name(f"{stem.name}.csv.tmp{os.getpid()}")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(stem.with_name(f"{stem.name}.csv"))
    tmp = stem.with_name(f"{stem.name}.json.tmp{os.getpid()}")
    tmp.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    tmp.replace(stem.with_name(f"{stem.name}.json"))


def code_commit() -> str:
    """The git commit of the working directory's checkout, or ``"unknown"`` outside one."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_experiment(
    settings: Settings,
    data: str | Path,
    methods: Sequence[str],
    labelled: Sequence[int],
    folds: Sequence[int],
    out: str | Path,
    *,
    pretrain_scope: str = "all",
    meta: dict | None = None,
    progress: bool = True,
) -> list[dict]:
    """Pretrain as needed, fine-tune every (method, M, fold), evaluate, and keep the table current.

    ``pretrain_scope``: ``"all"`` pretrains once per method on every patient without labels (the
    paper's protocol); ``"train"`` pretrains once per method and fold without the test fold's patients.
    """
    data, out = Path(data), Path(out)
    unknown = [m for m in methods if m not in FINETUNE_METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; expected {', '.join(FINETUNE_METHODS)}")
    if pretrain_scope not in ("all", "train"):
        raise ValueError(f"pretrain_scope must be 'all' or 'train', got {pretrain_scope!r}")
    patients = sorted({c.patient for c in find_cases(data, settings.data.layout)})
    for fold in folds:  # check every fold and budget before spending any time
        split = fold_split(patients, fold, settings.splits)
        too_many = [m for m in labelled if m > len(split.train)]
        if too_many:
            raise ValueError(f"M = {too_many[0]} labelled patients requested but fold {fold} has only "
                             f"{len(split.train)} training patients")
    started = time.perf_counter()
    meta = dict(meta or {})
    for fold in folds:  # fold by fold, so a stopped run leaves every method with the same folds done
        for method in methods:
            encoder = None
            if method in PRETRAINED:
                encoder = _pretrained_encoder(settings, data, method, fold, out, pretrain_scope, progress)
            for m in labelled:
                folder = out / "finetune" / method / f"M{m}" / f"fold{fold}"
                if (folder / "result.json").is_file():
                    continue
                finetune(settings, data, method, fold, m, folder, encoder=encoder,
                         resume=(folder / "checkpoint.pt").is_file(), progress=progress)
                rows = collect_table(out)
                write_table(rows, out, {**meta, "seconds_this_session": round(time.perf_counter() - started, 1)})
    rows = collect_table(out)
    write_table(rows, out, {**meta, "seconds_this_session": round(time.perf_counter() - started, 1)})
    return rows
