"""Figures and a widget for the matching objective (Eq. 2): bordered score and transport matrices.

:func:`assignment_matrix` draws an ``(M+1, N+1)`` matrix whose last row and column are the dustbins,
with its numbers in the cells and the true assignment boxed; :func:`sinkhorn_explorer` is a widget that
redraws the transport plan of :func:`kpssl.losses.log_sinkhorn` as the number of iterations and the
dustbin score change (it needs a running kernel; the chapters show a static figure beside it).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle

from ..losses.matching import log_sinkhorn

__all__ = ["assignment_matrix", "transport_plan", "sinkhorn_explorer"]


def _truth_cells(match12: np.ndarray, match21: np.ndarray) -> list[tuple[int, int]]:
    """(row, column) of every true cell: matched pairs, and the dustbin of each unmatched keypoint."""
    m, n = len(match12), len(match21)
    cells = [(a, int(b) if b >= 0 else n) for a, b in enumerate(match12)]
    cells += [(m, b) for b in range(n) if match21[b] < 0]
    return cells


def assignment_matrix(
    ax: plt.Axes,
    values: np.ndarray,
    match12: np.ndarray | torch.Tensor | None = None,
    match21: np.ndarray | torch.Tensor | None = None,
    *,
    title: str = "",
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    fmt: str = "{:.2f}",
) -> AxesImage:
    """Draw a bordered ``(M+1, N+1)`` matrix (last row and column: the dustbins) with its numbers.

    ``match12 (M,)`` and ``match21 (N,)`` (partner index or -1), when given, box the true assignment
    in red: each matched pair, and the dustbin cell of each keypoint without a partner. Returns the
    image, for a colour bar.
    """
    values = np.asarray(values, dtype=float)
    if values.ndim != 2 or min(values.shape) < 1:
        raise ValueError(f"values must be a (M+1, N+1) matrix, got shape {values.shape}")
    m, n = values.shape[0] - 1, values.shape[1] - 1
    image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax)
    for r in range(m + 1):
        for c in range(n + 1):
            red, green, blue, _ = image.cmap(image.norm(values[r, c]))
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            text = fmt.format(values[r, c])
            text = "0" if float(text) == 0 else text  # no "-0.00"
            ax.text(c, r, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    if match12 is not None and match21 is not None:
        match12, match21 = np.asarray(match12).reshape(-1), np.asarray(match21).reshape(-1)
        if (len(match12), len(match21)) != (m, n):
            raise ValueError(f"matches of {len(match12)} and {len(match21)} keypoints do not fit a {(m + 1, n + 1)} matrix")
        for r, c in _truth_cells(match12, match21):
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, ec="red", lw=2))
    ax.axhline(m - 0.5, color="white", lw=2)
    ax.axvline(n - 0.5, color="white", lw=2)
    ax.set_xticks(range(n + 1), [f"b{b}" for b in range(n)] + ["dustbin"], fontsize=9)
    ax.set_yticks(range(m + 1), [f"a{a}" for a in range(m)] + ["dustbin"], fontsize=9)
    ax.set_xlabel("keypoint of slice 2")
    ax.set_ylabel("keypoint of slice 1")
    if title:
        ax.set_title(title, fontsize=10)
    return image


def transport_plan(scores: torch.Tensor, dustbin: float, iterations: int) -> np.ndarray:
    """``P = exp(log P)`` of one sample, ``(M+1, N+1)``, from scores ``(1, M, N)`` or ``(M, N)``."""
    if scores.dim() == 2:
        scores = scores[None]
    if scores.dim() != 3 or scores.shape[0] != 1:
        raise ValueError(f"scores must be (M, N) or (1, M, N), got {tuple(scores.shape)}")
    with torch.no_grad():
        return log_sinkhorn(scores, float(dustbin), int(iterations)).exp()[0].cpu().numpy()


def sinkhorn_explorer(
    scores: torch.Tensor,
    match12: np.ndarray | torch.Tensor,
    match21: np.ndarray | torch.Tensor,
    dustbin: float = 1.0,
    iterations: int = 100,
):
    """An ipywidgets view of the transport plan against the iterations and the dustbin score.

    Sliders: ``iterations`` (1 to 200) and the dustbin score ``alpha`` (-3 to 8); the plan of
    :func:`transport_plan` is redrawn with the true assignment boxed. Needs a running kernel.
    """
    import ipywidgets as widgets

    steps = widgets.IntSlider(value=int(iterations), min=1, max=200, description="iterations",
                              continuous_update=False)
    alpha = widgets.FloatSlider(value=float(dustbin), min=-3.0, max=8.0, step=0.25, description="alpha",
                                continuous_update=False)
    output = widgets.Output()

    def draw(*_):
        plan = transport_plan(scores, alpha.value, steps.value)
        with output:
            output.clear_output(wait=True)
            fig, ax = plt.subplots(figsize=(5.4, 4.6))
            assignment_matrix(ax, plan, match12, match21, cmap="magma", vmin=0, vmax=1,
                              title=f"P after {steps.value} iterations, alpha = {alpha.value:.2f}")
            plt.tight_layout()
            plt.show()

    steps.observe(draw, names="value")
    alpha.observe(draw, names="value")
    draw()
    return widgets.VBox([widgets.HBox([steps, alpha]), output])
