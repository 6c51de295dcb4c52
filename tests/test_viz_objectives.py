"""The matching figures and the Sinkhorn widget: they draw the plan of log_sinkhorn, box the truth."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from kpssl.losses import log_sinkhorn
from kpssl.viz import assignment_matrix, sinkhorn_explorer, transport_plan


def example():
    scores = torch.randn(1, 3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    match12 = torch.tensor([1, -1, 0])
    match21 = torch.tensor([2, 0])
    return scores, match12, match21


def test_transport_plan_is_the_exponential_of_log_sinkhorn():
    scores, _, _ = example()
    plan = transport_plan(scores, 0.5, 7)
    expected = log_sinkhorn(scores, 0.5, 7).exp()[0].numpy()
    np.testing.assert_array_equal(plan, expected)
    np.testing.assert_array_equal(transport_plan(scores[0], 0.5, 7), expected)
    with pytest.raises(ValueError, match="scores"):
        transport_plan(torch.zeros(2, 3, 2), 1.0, 3)


def test_assignment_matrix_boxes_the_true_cells():
    scores, match12, match21 = example()
    fig, ax = plt.subplots()
    image = assignment_matrix(ax, transport_plan(scores, 1.0, 10), match12, match21)
    boxed = {(round(p.get_y() + 0.5), round(p.get_x() + 0.5)) for p in ax.patches}
    # a0 -> b1, a1 -> dustbin, a2 -> b0; every keypoint of slice 2 is matched
    assert boxed == {(0, 1), (1, 2), (2, 0)}
    assert image.get_array().shape == (4, 3)
    assert len(ax.texts) == 12  # one number per cell
    with pytest.raises(ValueError, match="do not fit"):
        assignment_matrix(ax, np.zeros((4, 3)), match12[:2], match21)
    plt.close(fig)


def test_sinkhorn_explorer_redraws_on_the_sliders():
    pytest.importorskip("ipywidgets")
    scores, match12, match21 = example()
    box = sinkhorn_explorer(scores, match12, match21, dustbin=1.0, iterations=5)
    steps, alpha = box.children[0].children
    assert (steps.value, alpha.value) == (5, 1.0)
    steps.value = 20  # observers redraw without error
    alpha.value = 3.0
    plt.close("all")
