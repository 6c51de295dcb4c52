"""Where a chosen keypoint attends: a static view and a widget over levels, blocks and heads.

:func:`keypoint_attention` draws one slice with its valid keypoints coloured by the attention they
receive from a query keypoint (the star), as ``n a_ij``: 1 (white) is the uniform share, red more,
blue less. :func:`keypoint_attention_widget` lets the reader choose the network, the slice, the query
keypoint, the KAF level, the block and the head (or their mean), and redraws the view; it needs a
running kernel, so the chapters show a static figure from :func:`keypoint_attention` beside it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.collections import PathCollection
from matplotlib.colors import TwoSlopeNorm
from torch import Tensor

__all__ = ["attention_row", "most_peaked_query", "keypoint_attention", "keypoint_attention_widget"]


def attention_row(weights: Tensor, valid: Tensor, query: int, head: int | None = None) -> np.ndarray:
    """The relative attention ``n a_qj`` of one query over the valid keys of one slice.

    Args:
        weights: (heads, K, K) attention of one slice; valid: (K,) bool; query: index in 0..K-1 of a
            valid keypoint; head: a head, or ``None`` for the mean over heads.

    Returns:
        (n,) float64, one entry per valid keypoint in slot order (mean 1 over the row).
    """
    if weights.ndim != 3 or weights.shape[-1] != weights.shape[-2] or valid.shape != weights.shape[-1:]:
        raise ValueError(f"expected weights (heads, K, K) and valid (K,), got {tuple(weights.shape)}, "
                         f"{tuple(valid.shape)}")
    if not 0 <= query < len(valid) or not bool(valid[query]):
        raise ValueError(f"query {query} is not a valid keypoint of this slice")
    if head is not None and not 0 <= head < weights.shape[0]:
        raise ValueError(f"head {head} out of range 0..{weights.shape[0] - 1}")
    row = (weights.mean(0) if head is None else weights[head])[query]  # (K,)
    n = int(valid.sum())
    return n * row[valid].double().numpy()


def most_peaked_query(weights: Tensor, valid: Tensor) -> int:
    """Index (0..K-1) of the valid query whose heads-averaged row has the largest weight."""
    if not bool(valid.any()):
        raise ValueError("the slice has no valid keypoint")
    rows = weights.mean(0)[valid][:, valid]  # (n, n)
    return int(torch.nonzero(valid).flatten()[int(rows.max(1).values.argmax())])


def keypoint_attention(ax: plt.Axes, image: np.ndarray, keypoints: Tensor, valid: Tensor, weights: Tensor,
                       query: int, head: int | None = None, *, top: float | None = None, title: str = "",
                       size: float = 45) -> PathCollection:
    """Draw the slice with its valid keypoints coloured by the attention from ``query`` (the star).

    Args:
        image: (H, W); keypoints: (K, 2) as (row, col); valid: (K,) bool; weights: (heads, K, K) of the
            slice; query, head: as in :func:`attention_row`; top: the colour scale's upper end (at
            least 2 by default, so weak rows are not exaggerated).

    Returns:
        the scatter of keypoints, for a colour bar.
    """
    relative = attention_row(weights, valid, query, head)  # (n,)
    points = keypoints[valid].double().numpy()  # (n, 2)
    star = keypoints[query].double().numpy()
    top = max(2.0, float(relative.max())) if top is None else top
    ax.imshow(image, cmap="gray", interpolation="nearest")
    dots = ax.scatter(points[:, 1], points[:, 0], c=relative, s=size, cmap="RdBu_r",
                      norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top), edgecolors="k", linewidths=0.5)
    ax.plot(star[1], star[0], "*", ms=16, color="yellow", mec="k")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)
    return dots


def keypoint_attention_widget(images: Tensor, keypoints: Tensor, valid: Tensor,
                              attention: Mapping[str, Sequence[Sequence[Tensor]]],
                              levels: Sequence[int] | None = None, titles: Sequence[str] | None = None):
    """An ipywidgets view of where a chosen keypoint attends. Needs a running kernel.

    Args:
        images: (B, 1, H, W) or (B, H, W); keypoints: (B, K, 2); valid: (B, K) bool.
        attention: network name -> per KAF level, per block, weights (B, heads, K, K) (for example
            :attr:`kpssl.eval.attention.KAFAttention.weights`).
        levels: the 1-based KAF level of each entry (default 1, 2, ...); titles: one per slice.

    Returns:
        the widget: controls for network, slice, keypoint (numbered among the slice's valid
        keypoints), level, block and head (or the mean of heads), above the figure.
    """
    import ipywidgets as widgets

    if not attention:
        raise ValueError("attention needs at least one network")
    images = images[:, 0] if images.ndim == 4 else images  # (B, H, W)
    names = list(attention)
    first = attention[names[0]]
    levels = list(levels) if levels is not None else list(range(1, len(first) + 1))
    if len(levels) != len(first):
        raise ValueError(f"{len(levels)} levels given for {len(first)} KAF levels of attention")
    heads = first[0][0].shape[1]
    network = widgets.Dropdown(options=names, description="network")
    slice_index = widgets.IntSlider(0, 0, images.shape[0] - 1, description="slice")
    keypoint = widgets.IntSlider(0, 0, max(0, int(valid[0].sum()) - 1), description="keypoint")
    level = widgets.Dropdown(options=[(str(v), i) for i, v in enumerate(levels)], description="KAF level")
    block = widgets.IntSlider(len(first[0]) - 1, 0, len(first[0]) - 1, description="block")
    head = widgets.Dropdown(options=[("mean", None)] + [(str(h), h) for h in range(heads)], description="head")
    output = widgets.Output()

    def draw(*_):
        b = slice_index.value
        slots = torch.nonzero(valid[b]).flatten()
        keypoint.max = max(0, len(slots) - 1)
        with output:
            output.clear_output(wait=True)
            fig, ax = plt.subplots(figsize=(5.5, 5))
            if len(slots) == 0:
                ax.imshow(images[b].numpy(), cmap="gray")
                ax.set_title("no valid keypoint on this slice", fontsize=10)
            else:
                weights = attention[network.value][level.value][block.value][b]  # (heads, K, K)
                query = int(slots[min(keypoint.value, len(slots) - 1)])
                which = "mean of heads" if head.value is None else f"head {head.value}"
                prefix = f"{titles[b]}\n" if titles is not None else ""
                dots = keypoint_attention(
                    ax, images[b].numpy(), keypoints[b], valid[b], weights, query, head.value,
                    title=f"{prefix}{network.value}, KAF level {levels[level.value]}, block "
                          f"{block.value + 1}, {which}")
                fig.colorbar(dots, ax=ax, fraction=0.046, pad=0.02, label="n a_ij (1 = uniform)")
            plt.show()

    for control in (network, slice_index, keypoint, level, block, head):
        control.observe(draw, names="value")
    draw()
    return widgets.VBox([widgets.HBox([network, slice_index, keypoint]), widgets.HBox([level, block, head]),
                         output])
