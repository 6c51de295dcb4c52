"""Figures of volumes and slices: label overlays, base-to-apex stacks, and a slice browser widget.

Every interactive widget has a static figure beside it, since the rendered book has no kernel.
"""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

__all__ = ["LABEL_COLOURS", "overlay", "show_slice", "slice_grid", "stack_figure", "slice_browser", "legend_handles"]

# background transparent, RV blue, myocardium green, LV red (then more for CT structures)
LABEL_COLOURS = ["#00000000", "#1f77b4", "#2ca02c", "#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2"]


def overlay(label: np.ndarray, classes: int | None = None) -> tuple[np.ndarray, ListedColormap]:
    """A masked label map and its colour map, for ``imshow`` over a grey image."""
    classes = classes or max(4, int(label.max()) + 1)
    return np.ma.masked_where(label == 0, label), ListedColormap(LABEL_COLOURS[:classes])


def legend_handles(names: dict[int, str]) -> list[Patch]:
    return [Patch(color=LABEL_COLOURS[k], label=v) for k, v in names.items() if k > 0]


def show_slice(ax: plt.Axes, image: np.ndarray, label: np.ndarray | None = None, *, alpha: float = 0.45,
               title: str | None = None, classes: int = 4) -> None:
    """Grey image with an optional translucent label overlay; no ticks."""
    ax.imshow(image, cmap="gray", interpolation="nearest")
    if label is not None:
        masked, cmap = overlay(label, classes)
        ax.imshow(masked, cmap=cmap, vmin=0, vmax=classes - 1, alpha=alpha, interpolation="nearest")
    if title:
        ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def slice_grid(images: Sequence[np.ndarray], labels: Sequence[np.ndarray | None], titles: Sequence[str],
               columns: int, *, names: dict[int, str] | None = None, size: float = 2.2) -> plt.Figure:
    """Slices in a grid, each with its label overlay, and a legend of the classes."""
    rows = int(np.ceil(len(images) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(size * columns, size * rows + (0.4 if names else 0)),
                             squeeze=False)
    for ax in axes.flat[len(images):]:
        ax.axis("off")
    for ax, image, label, title in zip(axes.flat, images, labels, titles):
        show_slice(ax, image, label, title=title)
    if names:
        fig.legend(handles=legend_handles(names), loc="lower center", ncol=len(names), frameon=False,
                   bbox_to_anchor=(0.5, 0.0))
        fig.tight_layout(rect=(0, 0.05, 1, 1))
    else:
        fig.tight_layout()
    return fig


def stack_figure(image: np.ndarray, label: np.ndarray | None, *, title: str = "", names: dict[int, str] | None = None,
                 size: float | None = None) -> plt.Figure:
    """Every slice of one volume from base (slice 0) to apex, with positions ``(i + 1) / Z``.

    The slices fill a near-square grid of at most four columns, about 7.6 inches wide unless ``size`` (inches
    per panel) is given, so that the figure fits a book's text column.
    """
    z = image.shape[0]
    titles = [f"slice {i}  pos {(i + 1) / z:.2f}" for i in range(z)]
    labels = [None] * z if label is None else list(label)
    columns = min(z, 4, int(np.ceil(np.sqrt(z))))
    size = size if size is not None else min(2.6, 7.6 / columns)
    fig = slice_grid(list(image), labels, titles, columns=columns, names=names, size=size)
    if title:
        fig.suptitle(title, fontsize=11)
        fig.tight_layout(rect=(0, 0.05 if names else 0, 1, 0.97))
    return fig


def slice_browser(volumes: dict[str, tuple[np.ndarray, np.ndarray | None]]):
    """An ipywidgets browser: choose a volume, a slice and the overlay. Needs a running kernel."""
    import ipywidgets as widgets

    names = list(volumes)
    volume = widgets.Dropdown(options=names, description="volume")
    first = volumes[names[0]][0]
    index = widgets.IntSlider(0, 0, first.shape[0] - 1, description="slice")
    show_labels = widgets.Checkbox(True, description="labels")
    output = widgets.Output()

    def draw(*_):
        image, label = volumes[volume.value]
        index.max = image.shape[0] - 1
        with output:
            output.clear_output(wait=True)
            fig, ax = plt.subplots(figsize=(4, 4))
            z = index.value
            show_slice(ax, image[z], label[z] if (show_labels.value and label is not None) else None,
                       title=f"{volume.value}: slice {z}, position {(z + 1) / image.shape[0]:.2f}")
            plt.show()

    for control in (volume, index, show_labels):
        control.observe(draw, names="value")
    draw()
    return widgets.VBox([widgets.HBox([volume, index, show_labels]), output])
