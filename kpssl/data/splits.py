"""Patient-level folds, validation splits and label budgets (the paper's experimental protocol).

All splits are over *patients*, never slices or frames, so no patient's anatomy is seen in training and
testing at once. The authors select the best epoch on the test fold; here a validation split is carved
from the training patients instead, and the M labelled patients are drawn from the rest.

Label budgets are nested: the M = 2 patients are among the M = 6 patients of the same fold, so a curve
over M compares like with like.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..settings import SplitSettings

__all__ = ["FoldSplit", "patient_folds", "fold_split", "labelled_subset"]


@dataclass(frozen=True)
class FoldSplit:
    """The patients of one fold: ``train`` (labelled pool), ``validation`` (model selection), ``test``."""

    fold: int
    train: tuple[str, ...]
    validation: tuple[str, ...]
    test: tuple[str, ...]


def patient_folds(patients: Sequence[str], folds: int, seed: int) -> list[tuple[str, ...]]:
    """Shuffle the (sorted, de-duplicated) patients with ``seed`` and cut them into ``folds`` test folds."""
    unique = sorted(set(patients))
    if folds < 2:
        raise ValueError(f"need at least 2 folds, got {folds}")
    if len(unique) < folds:
        raise ValueError(f"{len(unique)} patients cannot make {folds} folds")
    order = np.random.default_rng(seed).permutation(len(unique))
    return [tuple(unique[i] for i in sorted(part)) for part in np.array_split(order, folds)]


def fold_split(patients: Sequence[str], fold: int, settings: SplitSettings) -> FoldSplit:
    """Test fold ``fold``; of the other patients, a validation share and the training pool."""
    test_folds = patient_folds(patients, settings.folds, settings.fold_seed)
    if not 0 <= fold < settings.folds:
        raise ValueError(f"fold {fold} does not exist; folds are 0 .. {settings.folds - 1}")
    test = test_folds[fold]
    rest = sorted(set(patients) - set(test))
    order = np.random.default_rng([settings.fold_seed, fold]).permutation(len(rest))
    n_validation = int(round(settings.validation_fraction * len(rest)))
    if settings.validation_fraction > 0:
        n_validation = max(1, n_validation)
    if n_validation >= len(rest):
        raise ValueError(f"fold {fold}: {len(rest)} training patients leave none after {n_validation} for validation")
    validation = tuple(sorted(rest[i] for i in order[:n_validation]))
    train = tuple(sorted(rest[i] for i in order[n_validation:]))
    return FoldSplit(fold, train, validation, test)


def labelled_subset(split: FoldSplit, labelled: int, seed: int) -> tuple[str, ...]:
    """``labelled`` patients drawn from the fold's training pool; nested across budgets for one seed."""
    if labelled < 1:
        raise ValueError(f"the label budget M must be at least 1, got {labelled}")
    if labelled > len(split.train):
        raise ValueError(f"M = {labelled} labelled patients requested but fold {split.fold} has only "
                         f"{len(split.train)} training patients")
    order = np.random.default_rng([seed, split.fold]).permutation(len(split.train))
    return tuple(sorted(split.train[i] for i in order[:labelled]))
