"""Comparing two methods fold by fold: the paired difference, its standard error, and the book's rule.

Both methods of a comparison are tested on the same patients of each fold, so their difference is
taken fold by fold, ``d_k = a_k - b_k``, and summarised by its mean ``d`` and standard error
``s_d / sqrt(n)`` (``s_d`` the standard deviation of the ``d_k`` with n - 1 in the denominator). Pairing
removes what the folds share (some test patients are harder for every method), so it resolves smaller
differences than comparing the two means with their own spreads (chapter 7). The book calls a
difference *clear* when ``|d| > 2 SE``; with one fold there is no standard error and no judgement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

__all__ = ["PairedDifference", "paired_difference"]


@dataclass(frozen=True)
class PairedDifference:
    folds: tuple[int, ...]  # the folds both methods finished
    mean: float  # mean of a_k - b_k
    se: float  # its standard error (NaN with fewer than two folds)

    @property
    def clear(self) -> bool | None:
        """``|mean| > 2 SE``; None when there is no standard error (fewer than two folds)."""
        return None if math.isnan(self.se) else abs(self.mean) > 2 * self.se

    def verdict(self) -> str:
        if self.clear is None:
            return "cannot be judged (one fold)" if self.folds else "no common folds"
        return "clear" if self.clear else "within the noise"


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> PairedDifference:
    """Fold-paired difference of scores ``a`` and ``b`` (fold -> score) over the folds both have."""
    folds = tuple(sorted(set(a) & set(b)))
    d = [float(a[k]) - float(b[k]) for k in folds]
    n = len(d)
    if n == 0:
        return PairedDifference(folds, math.nan, math.nan)
    mean = sum(d) / n
    if n < 2:
        return PairedDifference(folds, mean, math.nan)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    return PairedDifference(folds, mean, sd / math.sqrt(n))
