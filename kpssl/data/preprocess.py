"""Preprocessing as in the paper (the paper's experimental protocol): in-plane resampling, clipping, z-score, pad/crop.

ACDC: resample every slice to 1.25 x 1.25 mm, then z-score each volume. CHD: clip to the 1st-99th
percentile, then z-score. Both: centre pad or crop to the patch size for evaluation (training crops
randomly later, in the augmentation).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..settings import DataSettings

__all__ = [
    "resample_inplane",
    "clip_percentiles",
    "zscore",
    "centre_offset",
    "center_pad_crop",
    "preprocess_volume",
]


def resample_inplane(
    array: np.ndarray, spacing: tuple[float, float, float], target: tuple[float, float], *, label: bool = False
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Resample ``array (Z, H, W)`` in-plane to ``target (row, col)`` mm; slices are left alone.

    Images use linear interpolation, labels nearest neighbour. Returns the array and its new spacing
    (the exact spacing of the new grid, which differs from ``target`` by rounding of the size).
    """
    z, h, w = array.shape
    new_h = max(1, int(round(h * spacing[1] / target[0])))
    new_w = max(1, int(round(w * spacing[2] / target[1])))
    if (new_h, new_w) == (h, w):
        return array.copy(), spacing
    zoom = (1.0, new_h / h, new_w / w)
    out = ndimage.zoom(array, zoom, order=0 if label else 1, mode="nearest", grid_mode=True)
    new_spacing = (spacing[0], spacing[1] * h / new_h, spacing[2] * w / new_w)
    return out.astype(array.dtype, copy=False), new_spacing


def clip_percentiles(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip intensities to the volume's ``low``-th and ``high``-th percentiles."""
    lo, hi = np.percentile(array, [low, high])
    return np.clip(array, lo, hi)


def zscore(array: np.ndarray) -> np.ndarray:
    """Per-volume zero mean, unit variance, returned as float32 (a constant volume becomes all zeros).

    Mean and standard deviation are computed in float64: in float32 the sum of a volume with large
    intensities overflows to infinity and the whole volume would come out as NaN or zero.
    """
    values = np.asarray(array, dtype=np.float64)
    std = float(values.std())
    out = (values - float(values.mean())) / (std if std > 0 else 1.0)
    if not np.all(np.isfinite(out)):
        raise ValueError("z-score: the volume holds non-finite values")
    return out.astype(np.float32)


def centre_offset(shape: tuple[int, int], size: int) -> tuple[int, int]:
    """The ``(row, col)`` offset of :func:`center_pad_crop`: ``out[r + dr, c + dc] = in[r, c]``."""
    return tuple((size - n) // 2 if n < size else -((n - size) // 2) for n in shape)  # type: ignore[return-value]


def center_pad_crop(array: np.ndarray, size: int, *, fill: float = 0.0) -> tuple[np.ndarray, tuple[int, int]]:
    """Centre pad and/or crop the last two axes to ``size x size``.

    Returns the result and the ``(row, col)`` offset that maps an input pixel to the output
    (``out[r + dr, c + dc] = in[r, c]``), so keypoints can follow.
    """
    h, w = array.shape[-2:]
    offsets = []
    out = array
    for axis, n in ((-2, h), (-1, w)):
        if n >= size:
            start = (n - size) // 2
            out = np.take(out, np.arange(start, start + size), axis=axis)
            offsets.append(-start)
        else:
            before = (size - n) // 2
            pad = [(0, 0)] * out.ndim
            pad[axis] = (before, size - n - before)
            out = np.pad(out, pad, constant_values=fill)
            offsets.append(before)
    return out, (offsets[0], offsets[1])


def preprocess_volume(
    image: np.ndarray,
    label: np.ndarray | None,
    spacing: tuple[float, float, float],
    settings: DataSettings,
) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float, float]]:
    """Resample, clip and normalise one volume; the label (if any) follows the resampling.

    Pad/crop is not applied here: keypoints are detected on the whole preprocessed slice, and the patch
    is cut later (randomly for training, centred for evaluation).
    """
    if settings.spacing_mm is not None:
        image, new_spacing = resample_inplane(image, spacing, tuple(settings.spacing_mm))
        if label is not None:
            label, _ = resample_inplane(label, spacing, tuple(settings.spacing_mm), label=True)
        spacing = new_spacing
    if settings.clip_percentiles is not None:
        image = clip_percentiles(image, *settings.clip_percentiles)
    return zscore(image), label, spacing
