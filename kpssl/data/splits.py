"""Patient-level folds, validation splits and label budgets (the paper's experimental protocol).

All splits are over *patients*, never slices or frames, so no patient's anatomy is seen in training and
testing at once.

The test folds and the labelled patients are the authors' exactly, so users with the real ACDC (or
CHD) data test on the paper's folds:

* folds: scikit-learn's ``KFold(n_splits=5, shuffle=True, random_state=12345)`` over the patients in
  sorted order (ACDC: patients 1..100; CHD: the sorted case numbers). ``KFold`` shuffles the indices
  once with numpy's legacy ``RandomState(seed).shuffle`` and cuts them into consecutive folds, the
  first ``n % folds`` one patient larger; :func:`patient_folds` does the same with numpy alone.
* labelled patients: the authors call ``random.seed(1234); random.sample(train_keys, M)`` on the
  training patients in sorted order; :func:`labelled_subset` calls Python's ``random.Random(seed).sample``.

The authors select the best epoch on the test fold. Here, by default, a validation split is carved from
the training patients first (``SplitSettings.validation_fraction``) and the M labelled patients are
drawn from the rest; with ``validation_fraction = 0`` (the ``*_authors`` presets) the pool is the whole
training fold and the draw is the authors' own.

Python's ``sample`` takes a prefix of one sequence of draws for pools of at most 21 patients, so there
the budgets are nested (the M = 1 patient is among the M = 2 patients); for larger pools it switches
method with M, and the authors' draws for different M are not nested.
"""

from __future__ import annotations

import random
import re
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


def _natural_key(name: str) -> tuple:
    """``"case10"`` after ``"case9"``: digit runs compare as numbers (the authors' numeric order)."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def patient_folds(patients: Sequence[str], folds: int, seed: int) -> list[tuple[str, ...]]:
    """The test folds of ``KFold(folds, shuffle=True, random_state=seed)`` over the sorted patients.

    Patients are de-duplicated and sorted by their numbers (``patient001`` .. ``patient100``); the
    sorted indices are shuffled by ``np.random.RandomState(seed).shuffle`` and cut into consecutive
    folds of sizes ``n // folds + 1`` (the first ``n % folds``) and ``n // folds``, as scikit-learn's
    ``KFold`` does. Each fold is returned in sorted order.
    """
    unique = sorted(set(patients), key=_natural_key)
    if folds < 2:
        raise ValueError(f"need at least 2 folds, got {folds}")
    if len(unique) < folds:
        raise ValueError(f"{len(unique)} patients cannot make {folds} folds")
    order = np.arange(len(unique))
    np.random.RandomState(seed).shuffle(order)  # the legacy generator, as scikit-learn's KFold
    sizes = np.full(folds, len(unique) // folds)
    sizes[: len(unique) % folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [tuple(unique[i] for i in sorted(order[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]


def fold_split(patients: Sequence[str], fold: int, settings: SplitSettings) -> FoldSplit:
    """Test fold ``fold``; of the other patients, a validation share and the training pool."""
    test_folds = patient_folds(patients, settings.folds, settings.fold_seed)
    if not 0 <= fold < settings.folds:
        raise ValueError(f"fold {fold} does not exist; folds are 0 .. {settings.folds - 1}")
    test = test_folds[fold]
    rest = sorted(set(patients) - set(test), key=_natural_key)
    order = np.random.default_rng([settings.fold_seed, fold]).permutation(len(rest))
    n_validation = int(round(settings.validation_fraction * len(rest)))
    if settings.validation_fraction > 0:
        n_validation = max(1, n_validation)
    if n_validation >= len(rest):
        raise ValueError(f"fold {fold}: {len(rest)} training patients leave none after {n_validation} for validation")
    validation = tuple(sorted((rest[i] for i in order[:n_validation]), key=_natural_key))
    train = tuple(sorted((rest[i] for i in order[n_validation:]), key=_natural_key))
    return FoldSplit(fold, train, validation, test)


def labelled_subset(split: FoldSplit, labelled: int, seed: int) -> tuple[str, ...]:
    """``labelled`` patients of the fold's training pool: ``random.Random(seed).sample(pool, M)``.

    The authors' draw (``random.seed(1234); random.sample(train_keys, M)``) on the pool in sorted order;
    returned sorted. The same for every fold, as the authors' seed is.
    """
    if labelled < 1:
        raise ValueError(f"the label budget M must be at least 1, got {labelled}")
    if labelled > len(split.train):
        raise ValueError(f"M = {labelled} labelled patients requested but fold {split.fold} has only "
                         f"{len(split.train)} training patients")
    drawn = random.Random(seed).sample(list(split.train), labelled)
    return tuple(sorted(drawn, key=_natural_key))
