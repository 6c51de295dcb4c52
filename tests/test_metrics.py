"""Metrics against hand-computed values on tiny volumes."""

import numpy as np
import pytest

from kpssl.eval.metrics import PooledDice, summarise, volume_scores


def test_dice_by_hand():
    ref = np.zeros((2, 4, 4), int)
    pred = np.zeros((2, 4, 4), int)
    ref[0, :2, :2] = 1  # 4 voxels
    pred[0, :2, :1] = 1  # 2 voxels, both inside
    ref[1, 0, 0] = 2
    scores = volume_scores(pred, ref, 4, (1, 1, 1))
    assert scores.dice[0] == pytest.approx(2 * 2 / (4 + 2))
    assert scores.dice[1] == 0.0  # class 2 missed entirely
    assert scores.dice[2] == 1.0  # class 3 absent from both


def test_hd95_of_single_voxels_uses_the_spacing():
    ref = np.zeros((5, 5, 5), int)
    pred = np.zeros((5, 5, 5), int)
    ref[0, 0, 0] = 1
    pred[0, 0, 3] = 1
    assert volume_scores(pred, ref, 2, (2.0, 1.0, 1.0)).hd95[0] == pytest.approx(3.0)
    pred[:] = 0
    pred[3, 0, 0] = 1
    assert volume_scores(pred, ref, 2, (2.0, 1.0, 1.0)).hd95[0] == pytest.approx(6.0)
    pred[:] = 0
    pred[0, 4, 0] = 1
    assert volume_scores(pred, ref, 2, (2.0, 0.5, 1.0)).hd95[0] == pytest.approx(2.0)


def test_hd95_undefined_when_a_structure_is_missing():
    ref = np.zeros((3, 6, 6), int)
    ref[1, 2:4, 2:4] = 1
    scores = volume_scores(np.zeros_like(ref), ref, 2, (1, 1, 1))
    assert np.isnan(scores.hd95[0]) and scores.dice[0] == 0


def test_pooled_dice_differs_from_mean_of_slices():
    pooled = PooledDice(2)
    a = np.zeros((4, 4), int)
    b = np.zeros((4, 4), int)
    a[:2, :2] = 1
    b[:2, :2] = 1  # perfect slice, 4 voxels
    pooled.update(a, b)
    c = np.zeros((4, 4), int)
    d = np.zeros((4, 4), int)
    d[0, 0] = 1  # missed slice, 1 voxel
    pooled.update(c, d)
    assert pooled.mean() == pytest.approx(2 * 4 / (4 + 5))


def test_summarise():
    ref = np.zeros((2, 6, 6), int)
    ref[:, 1:3, 1:3] = 1
    s1 = volume_scores(ref, ref, 3, (1, 1, 1), "a")
    s2 = volume_scores(np.zeros_like(ref), ref, 3, (1, 1, 1), "b")
    pooled = PooledDice(3)
    pooled.update(ref, ref)
    table = summarise([s1, s2], pooled, ["x", "y"])
    assert table["dice_3d_per_class"] == {"x": 0.5, "y": 1.0}
    assert table["hd95_mm_per_class"]["x"] == 0.0 and np.isnan(table["hd95_mm_per_class"]["y"])
    assert table["hd95_undefined"] == 3 and table["volumes"] == 2
