"""Keypoints through one chosen augmentation: a transform from slider values, its figure and a widget.

:func:`chosen_transform` builds a :class:`kpssl.keypoints.ViewTransform` with
:func:`kpssl.keypoints.sample_transform` from settings whose ranges are single values (rotation, scale,
elastic strength), then applies the chosen mirrors as ``sample_transform`` does (before the rotation);
the seed draws the crop and the elastic field. :func:`tracked_keypoints` draws the source slice with
the patch outline and the view with the keypoints that stay, and marks those that became invalid.
:func:`augmentation_widget` redraws that figure from sliders (it needs a running kernel; the chapters
show a static figure beside it).
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np

from ..keypoints.augment import AugmentedView, ViewTransform, apply_transform, displacement_at, sample_transform
from ..settings import AugmentSettings

__all__ = ["MIRRORS", "chosen_transform", "patch_outline", "tracked_keypoints", "augmentation_widget"]

MIRRORS = {"none": (1.0, 1.0), "rows": (-1.0, 1.0), "columns": (1.0, -1.0), "both": (-1.0, -1.0)}


def chosen_transform(
    source_shape: tuple[int, int],
    size: int,
    *,
    rotation: float = 0.0,
    scale: float = 1.0,
    elastic: float = 0.0,
    sigma: float = 15.0,
    flip: str = "none",
    seed: int = 0,
) -> ViewTransform:
    """One view with the chosen parameters: ``rotation`` in degrees, ``scale`` (source pixels per view
    pixel), ``elastic`` the strength alpha of the displacement field (0: none) with smoothness
    ``sigma``, ``flip`` one of :data:`MIRRORS`. ``seed`` draws the crop and the field.

    Without rotation, scaling or elastic field the view is a crop with mirrors (exact by slicing).
    """
    if flip not in MIRRORS:
        raise ValueError(f"flip must be one of {sorted(MIRRORS)}, got {flip!r}")
    if scale <= 0 or elastic < 0 or sigma <= 0:
        raise ValueError(f"need scale > 0, elastic >= 0, sigma > 0; got {scale}, {elastic}, {sigma}")
    deform = rotation % 360 != 0 or scale != 1 or elastic > 0
    theta = math.radians(rotation)
    settings = AugmentSettings(flip=False, p_deform=1.0 if deform else 0.0, elastic_alpha=(elastic, elastic),
                               elastic_sigma=(sigma, sigma), rotation=(theta, theta), scale=(scale, scale))
    drawn = sample_transform(np.random.default_rng(seed), source_shape, size, settings)
    centre = np.full(2, (size - 1) / 2.0)
    crop = drawn.offset - centre + drawn.matrix @ centre  # sample_transform: offset = crop + centre - A centre
    matrix = np.diag(MIRRORS[flip]) @ drawn.matrix  # A = scale * F R, as sample_transform builds it
    return ViewTransform(matrix, crop + centre - matrix @ centre, size, tuple(source_shape), drawn.field)


def patch_outline(transform: ViewTransform, steps: int = 60) -> np.ndarray:
    """Where the border of the patch comes from in the source slice: ``s(x)`` along the border,
    ``(4 steps, 2)`` (row, col)."""
    t = np.linspace(0, transform.size - 1, steps)
    last = np.full(steps, transform.size - 1.0)
    first = np.zeros(steps)
    border = np.concatenate([np.stack([first, t], 1), np.stack([t, last], 1),
                             np.stack([last, t[::-1]], 1), np.stack([t[::-1], first], 1)])  # (4 steps, 2)
    if transform.field is not None:
        border = border + displacement_at(transform.field, transform.size, border)
    return border @ transform.matrix.T + transform.offset


def tracked_keypoints(
    axes: tuple[plt.Axes, plt.Axes],
    image: np.ndarray,
    label: np.ndarray | None,
    points: np.ndarray,
    transform: ViewTransform,
    fill: float = 0.0,
    title: str = "",
) -> AugmentedView:
    """Apply ``transform`` to ``image (H, W)``, ``label`` and ``points (n, 2)`` and draw both sides.

    Left: the source slice, the patch outline (yellow), the keypoints that stay (coloured by their
    direction from the slice centre) and those that became invalid (red crosses). Right: the view with
    the kept keypoints in the same colours and the warped label outlines. Returns the view.
    """
    points = np.asarray(points, np.float64).reshape(-1, 2)
    view = apply_transform(image, label, points, transform, fill)
    angle = np.arctan2(points[:, 0] - image.shape[0] / 2, points[:, 1] - image.shape[1] / 2)
    colours = plt.get_cmap("hsv")((angle + np.pi) / (2 * np.pi))  # (n, 4)
    source_ax, view_ax = axes
    source_ax.imshow(image, cmap="gray")
    outline = patch_outline(transform)
    source_ax.plot(outline[:, 1], outline[:, 0], color="yellow", lw=1.2)
    kept, lost = view.valid, ~view.valid
    source_ax.scatter(points[kept, 1], points[kept, 0], s=14, c=colours[kept], edgecolors="k", linewidths=0.3)
    source_ax.scatter(points[lost, 1], points[lost, 0], s=22, c="red", marker="x", linewidths=1.2)
    low = np.minimum(outline.min(0), 0) - 2  # show the whole outline, even where it leaves the slice
    high = np.maximum(outline.max(0), image.shape) + 2
    source_ax.set_xlim(low[1], high[1])
    source_ax.set_ylim(high[0], low[0])
    source_ax.set_title(f"source: {int(kept.sum())} of {len(points)} keypoints stay, "
                        f"{int(lost.sum())} invalid (x)", fontsize=9)
    view_ax.imshow(view.image.numpy(), cmap="gray")
    if view.label is not None:
        view_ax.contour(view.label.numpy(), levels=np.arange(0.5, int(view.label.max()) + 1), colors="w",
                        linewidths=0.5, alpha=0.7)
    view_ax.scatter(view.points[kept, 1], view.points[kept, 0], s=14, c=colours[kept], edgecolors="k",
                    linewidths=0.3)
    view_ax.set_title(title or f"view, {transform.size} x {transform.size}", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    return view


def augmentation_widget(
    image: np.ndarray, label: np.ndarray | None, points: np.ndarray, size: int, fill: float = 0.0
):
    """An ipywidgets view of :func:`tracked_keypoints` under :func:`chosen_transform`.

    Sliders: rotation (degrees), scale, elastic strength alpha, seed; a choice of mirrors. Needs a
    running kernel.
    """
    import ipywidgets as widgets

    options = dict(continuous_update=False, style={"description_width": "initial"})
    rotation = widgets.FloatSlider(value=0.0, min=0.0, max=360.0, step=5.0, description="rotation (deg)",
                                   **options)
    scale = widgets.FloatSlider(value=1.0, min=0.5, max=1.5, step=0.05, description="scale", **options)
    elastic = widgets.FloatSlider(value=0.0, min=0.0, max=600.0, step=25.0, description="elastic alpha",
                                  **options)
    seed = widgets.IntSlider(value=0, min=0, max=50, description="seed", **options)
    flip = widgets.Dropdown(options=list(MIRRORS), value="none", description="mirror")
    output = widgets.Output()

    def draw(*_):
        transform = chosen_transform(image.shape, size, rotation=rotation.value, scale=scale.value,
                                     elastic=elastic.value, flip=flip.value, seed=seed.value)
        with output:
            output.clear_output(wait=True)
            fig, axes = plt.subplots(1, 2, figsize=(8.0, 4.0))
            tracked_keypoints(axes, image, label, points, transform, fill)
            plt.tight_layout()
            plt.show()

    controls = (rotation, scale, elastic, seed, flip)
    for control in controls:
        control.observe(draw, names="value")
    draw()
    return widgets.VBox([widgets.HBox([rotation, scale, elastic]), widgets.HBox([seed, flip]), output])
