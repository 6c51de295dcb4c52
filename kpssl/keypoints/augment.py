"""Joint geometric augmentation of a slice, its label mask and its keypoints (the paper's experimental protocol).

One view is one map from output (patch) pixels ``x = (row, col)`` to source positions::

    s(x) = A (x + u(x)) + b,      A = scale * F R(theta),   b = o + c - A c,

with ``c = (P - 1) / 2`` the patch centre, ``R`` a rotation, ``F = diag(+-1, +-1)`` the mirrors, ``o`` the
random crop offset and ``u`` an elastic displacement field on the patch grid. This is the order of the
authors' batchgenerators pipeline: random crop, mirror, then (with probability ``p_deform``) elastic
displacement of the patch coordinates followed by rotation and scaling about the patch centre. Like
batchgenerators, ``scale`` multiplies the sampling coordinates (``scale > 1`` shrinks the content).

The image is resampled once with ``torch.nn.functional.grid_sample`` (bilinear, outside filled with
``fill``), the label with the same grid (nearest, outside = 0). Views without deformation are integer
shifts and mirrors, cut by slicing (no interpolation at all).

Keypoints follow exactly: a source keypoint ``p`` lands where ``s(x) = p``, i.e. ``x + u(x) = q`` with
``q = A^-1 (p - b)``, solved to 1e-4 px by Newton steps (the fixed-point iteration ``x <- q - u(x)`` also
converges, the field's gradient being far below 1, but needs about 15 steps), with ``u`` bilinear
exactly as the sampling grid sees it. A keypoint whose iteration
does not converge, or that lands outside ``[0, P - 1]`` on either axis, becomes invalid (the hull of the
patch's pixel centres, so rounding, flooring and bilinear reads of a valid keypoint stay inside).

Elastic field: the classical Simard transform (batchgenerators, torchvision) displaces by
``alpha * G_sigma * U(-1, 1)`` white noise per pixel: a stationary Gaussian random field with standard
deviation ``alpha / (2 sqrt(3 pi) sigma)`` per axis (about 1 to 4 px for alpha 100-350, sigma 14-17) and a
Gaussian autocorrelation of width ``sigma sqrt(2)``. Smoothing the full-resolution field with a kernel
that wide costs about a second per view (DESIGN). We draw the same random field on nodes every
``sigma / 2`` pixels (white noise smoothed by a Gaussian of ``sigma`` pixels = 2 nodes, scaled to the same
standard deviation) and interpolate it bilinearly in between: same magnitude, same correlation length,
a few hundred microseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..settings import AugmentSettings

__all__ = [
    "ViewTransform",
    "AugmentedView",
    "sample_transform",
    "centre_transform",
    "elastic_field",
    "displacement_at",
    "warp_image",
    "warp_label",
    "warp_points",
    "augment_view",
    "apply_transform",
]

_NODES_PER_SIGMA = 2.0  # coarse-field nodes per sigma pixels
_SOLVER_STEPS = 30
_SOLVER_TOLERANCE = 1e-4  # pixels; residual |x + u(x) - q| accepted as exact


@dataclass
class ViewTransform:
    """``s(x) = matrix @ (x + u(x)) + offset`` from output pixel ``x`` (row, col) to the source slice.

    ``matrix (2, 2)``, ``offset (2,)`` float64; ``size`` the patch side P; ``source_shape (H, W)``;
    ``field (2, n, n)`` float64 the displacement ``u`` (row, col components) at nodes
    ``x_k = k (P - 1) / (n - 1)`` of both axes, bilinear in between, or None (no deformation).
    """

    matrix: np.ndarray
    offset: np.ndarray
    size: int
    source_shape: tuple[int, int]
    field: np.ndarray | None = None

    def is_integer_shift(self) -> bool:
        """True when the map is a pure mirror + integer shift (exact by slicing)."""
        a = self.matrix
        return (self.field is None and a[0, 1] == 0 and a[1, 0] == 0 and abs(a[0, 0]) == 1 and abs(a[1, 1]) == 1
                and bool(np.all(self.offset == np.round(self.offset))))


@dataclass
class AugmentedView:
    """One augmented view: ``image (P, P)`` float32, ``label (P, P)`` int64 or None, ``points (n, 2)``
    float32 (invalid ones set to (0, 0)), ``valid (n,)`` bool."""

    image: torch.Tensor
    label: torch.Tensor | None
    points: np.ndarray
    valid: np.ndarray


def _check_patch(size: int, source_shape: tuple[int, int]) -> None:
    if size < 2:
        raise ValueError(f"patch side must be >= 2, got {size}")
    if len(source_shape) != 2 or min(source_shape) < 1:
        raise ValueError(f"source shape must be (H, W) with H, W >= 1, got {source_shape}")


def elastic_field(rng: np.random.Generator, size: int, alpha: float, sigma: float) -> np.ndarray:
    """Coarse nodes ``(2, n, n)`` float64 of a Simard-like displacement field for a ``size`` patch.

    Matches the per-axis standard deviation ``alpha / (2 sqrt(3 pi) sigma)`` and the correlation length
    ``sigma`` of ``alpha * G_sigma * U(-1, 1)``; nodes every about ``sigma / 2`` pixels (module docstring).
    """
    if sigma <= 0 or alpha < 0:
        raise ValueError(f"elastic alpha must be >= 0 and sigma > 0, got alpha {alpha}, sigma {sigma}")
    nodes = max(2, math.ceil((size - 1) * _NODES_PER_SIGMA / sigma) + 1)
    spacing = (size - 1) / (nodes - 1)  # pixels between nodes
    node_sigma = sigma / spacing  # the smoothing width in nodes
    radius = max(1, math.ceil(3 * node_sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / node_sigma) ** 2)
    taps /= taps.sum()
    band = np.zeros((nodes, nodes + 2 * radius))  # valid correlation with `taps` as a matrix
    band[np.arange(nodes)[:, None], np.arange(nodes)[:, None] + np.arange(2 * radius + 1)] = taps
    noise = rng.standard_normal((2, nodes + 2 * radius, nodes + 2 * radius))
    smooth = band @ noise @ band.T  # (2, n, n); unit white noise -> standard deviation sum(taps^2)
    target_std = alpha / (2.0 * math.sqrt(3.0 * math.pi) * sigma)
    return smooth * (target_std / float((taps ** 2).sum()))


def displacement_at(field: np.ndarray, size: int, points: np.ndarray) -> np.ndarray:
    """Bilinear ``u`` at ``points (m, 2)`` (row, col) -> ``(m, 2)``; constant extension past the patch."""
    return _displacement_and_jacobian(field, size, points)[0]


def _displacement_and_jacobian(field: np.ndarray, size: int, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear ``u (m, 2)`` and its Jacobian ``du_i / dx_j (m, 2, 2)`` at ``points (m, 2)``."""
    nodes = field.shape[-1]
    per_pixel = (nodes - 1) / (size - 1)  # node units per pixel
    raw = points * per_pixel  # (m, 2) node coordinates
    scaled = np.clip(raw, 0.0, nodes - 1)
    slope = np.where(raw == scaled, per_pixel, 0.0)  # (m, 2): 0 where the constant extension applies
    low = np.minimum(scaled.astype(np.int64), nodes - 2)  # (m, 2) cell corner (scaled >= 0)
    fr, fc = (scaled - low).T  # (m,) each
    r0, c0 = low.T
    f00, f01 = field[:, r0, c0], field[:, r0, c0 + 1]  # (2, m) each
    f10, f11 = field[:, r0 + 1, c0], field[:, r0 + 1, c0 + 1]
    top = f00 + fc * (f01 - f00)  # (2, m)
    bottom = f10 + fc * (f11 - f10)
    u = top + fr * (bottom - top)  # (2, m)
    d_row = (bottom - top) * slope[:, 0]  # (2, m) du / d row
    d_col = ((f01 - f00) + fr * (f11 - f10 - f01 + f00)) * slope[:, 1]  # (2, m) du / d col
    return u.T, np.stack([d_row, d_col], axis=-1).transpose(1, 0, 2)  # (m, 2), (m, 2, 2)


def sample_transform(
    rng: np.random.Generator, source_shape: tuple[int, int], size: int, settings: AugmentSettings
) -> ViewTransform:
    """Draw one view: random crop (or random placement when the slice is smaller), mirrors, and with
    probability ``p_deform`` elastic + rotation + scale (the paper's experimental protocol)."""
    _check_patch(size, source_shape)
    if not 0 <= settings.p_deform <= 1:
        raise ValueError(f"p_deform must be in [0, 1], got {settings.p_deform}")
    crop = np.array([rng.integers(min(0, n - size), max(0, n - size) + 1) for n in source_shape], np.float64)
    mirror = np.array([-1.0 if settings.flip and rng.random() < 0.5 else 1.0 for _ in range(2)])
    matrix = np.diag(mirror)
    field = None
    if rng.random() < settings.p_deform:
        alpha = rng.uniform(*settings.elastic_alpha)
        sigma = rng.uniform(*settings.elastic_sigma)
        theta = rng.uniform(*settings.rotation)
        scale = rng.uniform(*settings.scale)
        rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        matrix = scale * matrix @ rotation
        field = elastic_field(rng, size, alpha, sigma)
    centre = np.full(2, (size - 1) / 2.0)
    return ViewTransform(matrix, crop + centre - matrix @ centre, size, tuple(source_shape), field)


def centre_transform(source_shape: tuple[int, int], size: int) -> ViewTransform:
    """The deterministic centre pad/crop of :func:`kpssl.data.center_pad_crop` as a transform."""
    _check_patch(size, source_shape)
    start = np.array([(n - size) // 2 if n >= size else -((size - n) // 2) for n in source_shape], np.float64)
    return ViewTransform(np.eye(2), start, size, tuple(source_shape))


def _slice_copy(source: np.ndarray, transform: ViewTransform, fill: float) -> np.ndarray:
    """The view of a mirror + integer-shift transform by slicing: ``(P, P)``, ``fill`` outside the source."""
    size = transform.size
    mirror = np.diag(transform.matrix)
    # Unmirrored window start: source row = start + x, then the window is mirrored (x -> P - 1 - x).
    start = np.round(transform.offset - np.where(mirror < 0, size - 1, 0)).astype(np.int64)
    out = np.full((size, size), fill, dtype=source.dtype)
    low = np.maximum(start, 0)
    high = np.minimum(start + size, source.shape)
    if np.all(high > low):
        out[low[0] - start[0]:high[0] - start[0], low[1] - start[1]:high[1] - start[1]] = \
            source[low[0]:high[0], low[1]:high[1]]
    out = out[::int(mirror[0]), ::int(mirror[1])]
    return np.ascontiguousarray(out)


def _sampling_grid(transform: ViewTransform) -> torch.Tensor:
    """``grid_sample`` grid ``(1, P, P, 2)`` (x = col, y = row, align_corners=False) of a transform."""
    size = transform.size
    height, width = transform.source_shape
    field = transform.field if transform.field is not None else np.zeros((2, 2, 2))
    nodes = field.shape[-1]
    axis = np.arange(nodes) * ((size - 1) / (nodes - 1))  # node positions in output pixels
    node_rows, node_cols = np.meshgrid(axis, axis, indexing="ij")  # (n, n) each
    y = np.stack([node_rows, node_cols]) + field  # (2, n, n)
    source = np.einsum("ij,jhw->ihw", transform.matrix, y) + transform.offset[:, None, None]  # (2, n, n)
    normalised = np.stack([(2 * source[1] + 1) / width - 1, (2 * source[0] + 1) / height - 1])  # (2, n, n) x, y
    coarse = torch.from_numpy(normalised.astype(np.float32))[None]  # (1, 2, n, n)
    # Bilinear upsampling reproduces the affine part exactly and interpolates u as displacement_at does.
    grid = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)  # (1, 2, P, P)
    return grid.permute(0, 2, 3, 1)  # (1, P, P, 2)


def warp_image(image: np.ndarray | torch.Tensor, transform: ViewTransform, fill: float = 0.0,
               grid: torch.Tensor | None = None) -> torch.Tensor:
    """Resample ``image (H, W)`` into the ``(P, P)`` float32 view; outside the slice is ``fill``."""
    source = torch.as_tensor(image, dtype=torch.float32)
    if tuple(source.shape) != tuple(transform.source_shape):
        raise ValueError(f"image shape {tuple(source.shape)} differs from the transform's {transform.source_shape}")
    if transform.is_integer_shift():
        return torch.from_numpy(_slice_copy(source.numpy(), transform, fill))
    grid = _sampling_grid(transform) if grid is None else grid
    shifted = source - fill if fill != 0 else source
    out = F.grid_sample(shifted[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = out[0, 0]  # (P, P)
    return out + fill if fill != 0 else out


def warp_label(label: np.ndarray | torch.Tensor, transform: ViewTransform,
               grid: torch.Tensor | None = None) -> torch.Tensor:
    """Resample ``label (H, W)`` (nearest) into the ``(P, P)`` int64 view; outside the slice is 0."""
    source = torch.as_tensor(label)
    if tuple(source.shape) != tuple(transform.source_shape):
        raise ValueError(f"label shape {tuple(source.shape)} differs from the transform's {transform.source_shape}")
    if transform.is_integer_shift():
        return torch.from_numpy(_slice_copy(source.numpy().astype(np.int64), transform, 0))
    grid = _sampling_grid(transform) if grid is None else grid
    out = F.grid_sample(source.to(torch.float32)[None, None], grid, mode="nearest", padding_mode="zeros",
                        align_corners=False)
    return out[0, 0].round().to(torch.int64)  # (P, P)


def warp_points(points: np.ndarray, transform: ViewTransform) -> tuple[np.ndarray, np.ndarray]:
    """Move source keypoints ``points (n, 2)`` (row, col) into the view -> ``points (n, 2)`` float32
    (invalid ones (0, 0)), ``valid (n,)`` bool (inside ``[0, P - 1]^2`` and solved exactly)."""
    points = np.asarray(points, np.float64).reshape(-1, 2)
    q = (points - transform.offset) @ np.linalg.inv(transform.matrix).T  # (n, 2): solve x + u(x) = q
    x = q.copy()
    converged = np.ones(len(points), bool)
    if transform.field is not None and len(points):
        # Newton on x + u(x) = q with the bilinear cell's exact Jacobian (a fixed-point step x <- q - u(x)
        # where I + J is nearly singular); converges in a few steps since |J| << 1.
        for _ in range(_SOLVER_STEPS):
            u, jacobian = _displacement_and_jacobian(transform.field, transform.size, x)
            residual = x + u - q  # (n, 2)
            error = np.abs(residual).max(axis=1)  # (n,)
            if error.max() < _SOLVER_TOLERANCE:
                break
            a, b = 1.0 + jacobian[:, 0, 0], jacobian[:, 0, 1]
            c, d = jacobian[:, 1, 0], 1.0 + jacobian[:, 1, 1]
            det = a * d - b * c  # (n,)
            safe = det > 0.05
            det = np.where(safe, det, 1.0)
            newton = np.stack([d * residual[:, 0] - b * residual[:, 1],
                               a * residual[:, 1] - c * residual[:, 0]], axis=1) / det[:, None]  # (n, 2)
            x = x - np.where(safe[:, None], newton, residual)
        converged = error < _SOLVER_TOLERANCE
    inside = np.all((x >= 0) & (x <= transform.size - 1), axis=1) & converged
    return np.where(inside[:, None], x, 0.0).astype(np.float32), inside


def augment_view(
    image: np.ndarray, label: np.ndarray | None, points: np.ndarray, rng: np.random.Generator, size: int,
    settings: AugmentSettings, fill: float = 0.0,
) -> AugmentedView:
    """Draw a transform (:func:`sample_transform`) and apply it to image, label and keypoints."""
    transform = sample_transform(rng, image.shape, size, settings)
    return apply_transform(image, label, points, transform, fill)


def apply_transform(image: np.ndarray, label: np.ndarray | None, points: np.ndarray, transform: ViewTransform,
                    fill: float = 0.0) -> AugmentedView:
    """Apply one transform to ``image (H, W)``, optional ``label (H, W)`` and ``points (n, 2)``."""
    grid = None if transform.is_integer_shift() else _sampling_grid(transform)
    warped = warp_image(image, transform, fill, grid)
    warped_label = None if label is None else warp_label(label, transform, grid)
    moved, valid = warp_points(points, transform)
    return AugmentedView(warped, warped_label, moved, valid)
