"""Correspondences between the keypoints of two neighbouring slices, and how neighbours are drawn.

Criterion (the paper's, as in the authors' ``find_match``), on the two slices' ORIGINAL keypoints:

1. ``M[a, b]`` Manhattan pixel distance and ``D[a, b]`` SIFT-descriptor L2 distance for all pairs;
2. weighting: ``W = D`` where ``M < radius_reverse``, else ``max(D)`` (the largest descriptor distance of
   the two slices);
3. nearest neighbours both ways: ``fwd[a] = argmin_b W[a, b]``, ``rev[b] = argmin_a W[a, b]`` (ties go to
   the lowest index);
4. a keypoint of slice 1 with no keypoint of slice 2 at ``M < radius_forward`` has no forward partner; a
   keypoint of slice 2 with none at ``M < radius_reverse`` has no reverse partner;
5. ``(a, b)`` is a match iff ``fwd[a] = b`` and ``rev[b] = a`` (mutual nearest neighbours); every other
   keypoint is unmatched.

"Within the radius" is strict (``<``), as in the authors' code. ACDC: forward 20, reverse and weighting
30; CHD: 20 and 20 (``KeypointSettings``).

After augmentation (:func:`restrict_matches`) a pair whose keypoint on either side left its patch is
dropped on both sides. Convention: only a VALID keypoint with ``match == -1`` belongs to the dustbin;
invalid ones count as nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .detect import SliceKeypoints

__all__ = [
    "Correspondences",
    "manhattan_distances",
    "descriptor_distances",
    "mutual_matches",
    "match_slices",
    "restrict_matches",
    "neighbour_slice",
    "neighbour_pairs",
]


@dataclass
class Correspondences:
    """Matches between two keypoint sets: ``match12 (n1,)`` and ``match21 (n2,)`` int64, ``-1`` unmatched."""

    match12: np.ndarray
    match21: np.ndarray

    @property
    def pairs(self) -> np.ndarray:
        """Matched index pairs ``(m, 2)`` int64, ordered by the slice-1 index."""
        first = np.flatnonzero(self.match12 >= 0)
        return np.stack([first, self.match12[first]], axis=1).astype(np.int64).reshape(-1, 2)

    @property
    def unmatched1(self) -> np.ndarray:
        return np.flatnonzero(self.match12 < 0)

    @property
    def unmatched2(self) -> np.ndarray:
        return np.flatnonzero(self.match21 < 0)

    @classmethod
    def from_match12(cls, match12: np.ndarray, n2: int) -> "Correspondences":
        """Rebuild ``match21`` from a one-to-one ``match12``."""
        match12 = np.asarray(match12, np.int64)
        match21 = np.full(n2, -1, np.int64)
        first = np.flatnonzero(match12 >= 0)
        match21[match12[first]] = first
        return cls(match12, match21)


def manhattan_distances(points1: np.ndarray, points2: np.ndarray) -> np.ndarray:
    """``|dr| + |dc|`` for all pairs: ``(n1, 2), (n2, 2) -> (n1, n2)`` float64."""
    p1 = np.asarray(points1, np.float64)
    p2 = np.asarray(points2, np.float64)
    return (np.abs(p1[:, None, 0] - p2[None, :, 0]) + np.abs(p1[:, None, 1] - p2[None, :, 1]))  # (n1, n2)


def descriptor_distances(descriptors1: np.ndarray, descriptors2: np.ndarray) -> np.ndarray:
    """Euclidean distances of all descriptor pairs: ``(n1, d), (n2, d) -> (n1, n2)`` float64."""
    d1 = np.asarray(descriptors1, np.float64)
    d2 = np.asarray(descriptors2, np.float64)
    squared = (d1 * d1).sum(1)[:, None] + (d2 * d2).sum(1)[None, :] - 2.0 * (d1 @ d2.T)  # (n1, n2)
    return np.sqrt(np.maximum(squared, 0.0))


def mutual_matches(
    points1: np.ndarray, descriptors1: np.ndarray, points2: np.ndarray, descriptors2: np.ndarray,
    radius_forward: float, radius_reverse: float,
) -> Correspondences:
    """The correspondence criterion of the module docstring, vectorised.

    Args: ``points (n, 2)`` (row, col) pixels and ``descriptors (n, 128)`` of each slice; radii in
    Manhattan pixels. Returns :class:`Correspondences` (one-to-one by construction).
    """
    if radius_forward <= 0 or radius_reverse <= 0:
        raise ValueError(f"radii must be positive, got forward {radius_forward}, reverse {radius_reverse}")
    n1, n2 = len(points1), len(points2)
    if len(descriptors1) != n1 or len(descriptors2) != n2:
        raise ValueError(f"points and descriptors disagree: {n1} vs {len(descriptors1)}, {n2} vs {len(descriptors2)}")
    if n1 == 0 or n2 == 0:
        return Correspondences(np.full(n1, -1, np.int64), np.full(n2, -1, np.int64))
    near = manhattan_distances(points1, points2)  # (n1, n2)
    descriptor = descriptor_distances(descriptors1, descriptors2)  # (n1, n2)
    weighted = np.where(near < radius_reverse, descriptor, descriptor.max())  # (n1, n2)
    forward = np.argmin(weighted, axis=1)  # (n1,) best partner in slice 2
    reverse = np.argmin(weighted, axis=0)  # (n2,) best partner in slice 1
    forward[~(near < radius_forward).any(axis=1)] = -1
    reverse[~(near < radius_reverse).any(axis=0)] = -1
    has = forward >= 0
    mutual = np.zeros(n1, bool)
    mutual[has] = reverse[forward[has]] == np.flatnonzero(has)
    match12 = np.where(mutual, forward, -1).astype(np.int64)
    return Correspondences.from_match12(match12, n2)


def match_slices(first: SliceKeypoints, second: SliceKeypoints, radius_forward: float,
                 radius_reverse: float) -> Correspondences:
    """:func:`mutual_matches` on two slices' keypoints."""
    return mutual_matches(first.points, first.descriptors, second.points, second.descriptors,
                          radius_forward, radius_reverse)


def restrict_matches(match12: np.ndarray, valid1: np.ndarray, valid2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop pairs with an invalid keypoint on either side (e.g. it left its patch after augmentation).

    ``match12 (n1,)`` int64 one-to-one, ``valid1 (n1,)``, ``valid2 (n2,)`` bool -> ``match12, match21``
    int64 with ``-1`` where unmatched. A keypoint whose partner became invalid becomes unmatched (dustbin
    if it is itself valid); an invalid keypoint is ``-1`` and counts as nothing.
    """
    match12 = np.asarray(match12, np.int64)
    valid1 = np.asarray(valid1, bool)
    valid2 = np.asarray(valid2, bool)
    if match12.shape != valid1.shape:
        raise ValueError(f"match12 {match12.shape} and valid1 {valid1.shape} differ")
    keep = (match12 >= 0) & valid1
    keep[keep] = valid2[match12[keep]]
    restricted = np.where(keep, match12, -1)
    return restricted, Correspondences.from_match12(restricted, len(valid2)).match21


def neighbour_slice(index: int, slices: int, rule: str, fraction: float, rng: np.random.Generator) -> int:
    """The partner slice of ``index`` for a pretraining pair (the paper's keypoints and correspondences).

    ``"adjacent"`` (ACDC): ``index +- 1`` with equal chance; at a volume end, the only neighbour.
    ``"fraction"`` (CHD): offset ``int(fraction * U(-1, 1) * slices)``, redrawn while it is 0 or leads
    outside the volume (as the authors do; clipping to the end slice would favour it). Where
    ``fraction * slices <= 1`` no such offset exists and the adjacent rule is used. A single-slice volume pairs its slice with itself (the two views then
    differ only by augmentation, and every keypoint matches itself).
    """
    if not 0 <= index < slices:
        raise ValueError(f"slice {index} outside a volume of {slices} slices")
    if slices == 1:
        return index
    if rule not in ("adjacent", "fraction"):
        raise ValueError(f"unknown neighbour rule {rule!r}; expected 'adjacent' or 'fraction'")
    if rule == "adjacent" or fraction * slices <= 1:
        if index == 0:
            return 1
        if index == slices - 1:
            return slices - 2
        return index + (1 if rng.random() < 0.5 else -1)
    while True:
        offset = int(fraction * rng.uniform(-1.0, 1.0) * slices)
        if offset != 0 and 0 <= index + offset < slices:
            return index + offset


def neighbour_pairs(slices: int, rule: str, fraction: float) -> np.ndarray:
    """All ordered ``(index, partner)`` pairs :func:`neighbour_slice` can return, ``(m, 2)`` int64."""
    if slices == 1:
        return np.zeros((1, 2), np.int64)
    if rule == "adjacent" or fraction * slices <= 1:
        reach = 1
    else:
        reach = max(1, int(fraction * slices))  # |int(f u Z)| <= int(f Z) for u in [-1, 1)
    pairs = [(i, j) for i in range(slices) for j in range(max(0, i - reach), min(slices, i + reach + 1)) if j != i]
    return np.asarray(pairs, np.int64).reshape(-1, 2)
