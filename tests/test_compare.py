"""Fold-paired differences (kpssl.eval.compare) against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from kpssl.eval.compare import paired_difference


def test_paired_difference_by_hand():
    a = {0: 0.70, 1: 0.60, 2: 0.80, 3: 0.75}
    b = {0: 0.60, 1: 0.55, 2: 0.65, 3: 0.70, 4: 0.9}  # fold 4 has no partner: left out
    d = paired_difference(a, b)
    # differences 0.10, 0.05, 0.15, 0.05: mean 0.0875; deviations .0125, -.0375, .0625, -.0375
    assert d.folds == (0, 1, 2, 3)
    assert d.mean == pytest.approx(0.0875, abs=1e-12)
    variance = (0.0125 ** 2 + 0.0375 ** 2 + 0.0625 ** 2 + 0.0375 ** 2) / 3
    assert d.se == pytest.approx(math.sqrt(variance / 4), abs=1e-12)  # 0.02394
    assert d.clear is True and d.verdict() == "clear"  # 0.0875 > 2 x 0.0239


def test_pairing_sees_a_consistent_difference_that_the_spread_of_the_folds_hides():
    a = {k: 0.3 + 0.1 * k + 0.02 for k in range(5)}  # folds differ a lot; a is always 0.02 higher
    b = {k: 0.3 + 0.1 * k + (0.01 if k % 2 else 0.0) for k in range(5)}
    d = paired_difference(a, b)
    assert d.clear is True
    noisy = paired_difference({0: 0.5, 1: 0.3}, {0: 0.3, 1: 0.5})
    assert noisy.mean == pytest.approx(0.0) and noisy.clear is False and noisy.verdict() == "within the noise"


def test_one_fold_or_none_cannot_be_judged():
    one = paired_difference({0: 0.5}, {0: 0.4, 1: 0.3})
    assert one.mean == pytest.approx(0.1) and math.isnan(one.se) and one.clear is None
    assert one.verdict() == "cannot be judged (one fold)"
    assert paired_difference({0: 0.5}, {1: 0.4}).verdict() == "no common folds"
