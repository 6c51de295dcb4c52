"""Keypoints through a chosen augmentation: the transform is sample_transform's, the figure marks
the keypoints that became invalid, and the widget redraws from its sliders."""

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest

from kpssl.keypoints import apply_transform, sample_transform, warp_points
from kpssl.settings import AugmentSettings
from kpssl.viz import augmentation_widget, chosen_transform, patch_outline, tracked_keypoints


def slice_and_points():
    rng = np.random.default_rng(0)
    image = rng.random((40, 48)).astype(np.float32)
    label = (image > 0.5).astype(np.int64)
    points = np.array([[20.0, 24.0], [5.0, 6.0], [30.5, 40.25], [1.0, 47.0]])
    return image, label, points


def test_chosen_transform_is_sample_transform_with_single_values():
    rotation, scale, elastic = 30.0, 1.2, 200.0
    ours = chosen_transform((40, 48), 32, rotation=rotation, scale=scale, elastic=elastic, sigma=15.0, seed=3)
    theta = math.radians(rotation)
    settings = AugmentSettings(flip=False, p_deform=1.0, elastic_alpha=(elastic, elastic),
                               elastic_sigma=(15.0, 15.0), rotation=(theta, theta), scale=(scale, scale))
    reference = sample_transform(np.random.default_rng(3), (40, 48), 32, settings)
    np.testing.assert_allclose(ours.matrix, reference.matrix)
    np.testing.assert_allclose(ours.offset, reference.offset)
    np.testing.assert_array_equal(ours.field, reference.field)


def test_mirrors_keep_the_crop_and_are_exact_slices():
    image, label, points = slice_and_points()
    plain = chosen_transform(image.shape, 32, seed=1)
    assert plain.is_integer_shift() and plain.field is None
    view = apply_transform(image, label, points, plain)
    np.testing.assert_allclose(view.points[view.valid], (points - plain.offset)[view.valid], atol=1e-5)
    centre = np.full(2, 31 / 2)
    for flip in ("rows", "columns", "both"):
        mirrored = chosen_transform(image.shape, 32, seed=1, flip=flip)
        assert mirrored.is_integer_shift()
        np.testing.assert_allclose(mirrored.matrix @ centre + mirrored.offset, plain.matrix @ centre + plain.offset)
        rows, cols = (-1 if flip in ("rows", "both") else 1), (-1 if flip in ("columns", "both") else 1)
        np.testing.assert_array_equal(apply_transform(image, None, points, mirrored).image.numpy(),
                                      view.image.numpy()[::rows, ::cols])
    with pytest.raises(ValueError, match="flip"):
        chosen_transform(image.shape, 32, flip="diagonal")
    with pytest.raises(ValueError, match="scale"):
        chosen_transform(image.shape, 32, scale=0.0)


def test_figure_marks_the_invalid_keypoints():
    image, label, points = slice_and_points()
    transform = chosen_transform(image.shape, 24, rotation=45.0, elastic=100.0, seed=2)
    fig, axes = plt.subplots(1, 2)
    view = tracked_keypoints(axes, image, label, points, transform)
    _, valid = warp_points(points, transform)
    np.testing.assert_array_equal(view.valid, valid)
    assert 0 < valid.sum() < len(points)  # some stay, some leave the smaller, rotated patch
    kept, lost = axes[0].collections[:2]
    assert len(kept.get_offsets()) == valid.sum() and len(lost.get_offsets()) == (~valid).sum()
    assert len(axes[1].collections[-1].get_offsets()) == valid.sum()
    assert patch_outline(transform, steps=10).shape == (40, 2)
    plt.close(fig)


def test_augmentation_widget_redraws_on_the_sliders():
    pytest.importorskip("ipywidgets")
    image, label, points = slice_and_points()
    box = augmentation_widget(image, label, points, 32)
    rotation, scale, elastic = box.children[0].children
    seed, flip = box.children[1].children
    rotation.value = 90.0  # observers redraw without error
    elastic.value = 300.0
    flip.value = "both"
    seed.value = 4
    plt.close("all")
