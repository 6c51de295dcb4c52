"""SIFT keypoints of one slice (the paper's keypoints and correspondences): OpenCV SIFT, default parameters, the K strongest.

The slice (preprocessed, before any crop or augmentation) is min-max scaled to ``uint8`` and given to
``cv2.SIFT_create()`` with default parameters. We keep the ``K`` strongest keypoints by SIFT response
(the authors keep all of them and truncate each batch to its smallest count; see the book's page of deviations).

Two details matter for exact tracking later:

* **Pixel centres.** This project puts pixel centres at integer coordinates. OpenCV's SIFT doubles the
  image first (``firstOctave = -1``) with a half-pixel-centred resize, but maps coordinates back by a
  plain factor 1/2, so every ``KeyPoint.pt`` sits a quarter pixel down-right of the blob it found: a
  Gaussian blob centred at ``(50.0, 70.0)`` is reported at ``pt = (70.25, 50.25)`` (measured with
  OpenCV 5.0; ``tests/test_keypoints.py`` re-checks it). We subtract :data:`SIFT_PIXEL_OFFSET`.
* **One keypoint per location.** SIFT returns a location once per dominant gradient orientation, with the
  same response and a different descriptor. Duplicates would fill K with copies and collide on one
  pixel of the KAF map, so by default only the first (in OpenCV's order) is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["SliceKeypoints", "SIFT_PIXEL_OFFSET", "DETECTOR_VERSION", "to_uint8", "detect_keypoints", "detect_volume"]

SIFT_PIXEL_OFFSET = 0.25  # OpenCV's KeyPoint.pt minus the true position, in pixels, both axes
DESCRIPTOR_DIM = 128
# Changes whenever detection changes meaning (it is part of every cache key).
DETECTOR_VERSION = f"sift-default-offset{SIFT_PIXEL_OFFSET}-unique-v1-opencv{cv2.__version__}"


@dataclass
class SliceKeypoints:
    """Keypoints of one slice, strongest first.

    ``points (n, 2)`` float32 ``(row, col)``, pixel centres at integers; ``descriptors (n, 128)`` float32
    SIFT descriptors; ``responses (n,)`` float32 SIFT responses, non-increasing. ``n`` may be 0.
    """

    points: np.ndarray
    descriptors: np.ndarray
    responses: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.points)
        if self.points.shape != (n, 2) or self.descriptors.shape != (n, DESCRIPTOR_DIM) or self.responses.shape != (n,):
            raise ValueError(f"inconsistent keypoint arrays: points {self.points.shape}, descriptors "
                             f"{self.descriptors.shape}, responses {self.responses.shape}; expected (n, 2), "
                             f"(n, {DESCRIPTOR_DIM}), (n,)")

    def __len__(self) -> int:
        return len(self.points)

    @classmethod
    def empty(cls) -> "SliceKeypoints":
        return cls(np.zeros((0, 2), np.float32), np.zeros((0, DESCRIPTOR_DIM), np.float32), np.zeros(0, np.float32))


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Min-max scale a 2D slice to ``uint8`` (0 .. 255); a constant slice becomes all zeros."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"expected a 2D slice (H, W), got shape {image.shape}")
    if image.size == 0:
        return np.zeros(image.shape, np.uint8)
    low, high = float(image.min()), float(image.max())
    if not np.isfinite(low) or not np.isfinite(high):
        raise ValueError("slice contains NaN or infinite values")
    if high <= low:
        return np.zeros(image.shape, np.uint8)
    return ((image - low) * (255.0 / (high - low))).astype(np.uint8)


def detect_keypoints(
    image: np.ndarray, max_keypoints: int, *, unique_locations: bool = True, detector: "cv2.SIFT | None" = None
) -> SliceKeypoints:
    """SIFT on one preprocessed slice ``image (H, W)``; the ``max_keypoints`` strongest, strongest first.

    ``detector`` lets a caller reuse one ``cv2.SIFT_create()`` over many slices (default parameters are
    part of the method: pass only a default-constructed one).
    """
    if max_keypoints < 0:
        raise ValueError(f"max_keypoints must be >= 0, got {max_keypoints}")
    gray = to_uint8(image)
    if max_keypoints == 0 or gray.max() == 0:
        return SliceKeypoints.empty()
    sift = detector if detector is not None else cv2.SIFT_create()
    found, descriptors = sift.detectAndCompute(gray, None)
    if not found:
        return SliceKeypoints.empty()
    xy = np.array([k.pt for k in found], np.float32)  # (n, 2) OpenCV (x, y)
    responses = np.array([k.response for k in found], np.float32)
    order = np.argsort(-responses, kind="stable")  # strongest first, ties in OpenCV's order
    if unique_locations:
        _, first = np.unique(xy[order], axis=0, return_index=True)  # first occurrence in `order`
        order = order[np.sort(first)]
    order = order[:max_keypoints]
    points = xy[order][:, ::-1] - np.float32(SIFT_PIXEL_OFFSET)  # (n, 2) (row, col)
    return SliceKeypoints(np.ascontiguousarray(points, np.float32), descriptors[order].astype(np.float32),
                          responses[order])


def detect_volume(image: np.ndarray, max_keypoints: int, *, unique_locations: bool = True) -> list[SliceKeypoints]:
    """:func:`detect_keypoints` on every slice of a volume ``image (Z, H, W)``."""
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"expected a volume (Z, H, W), got shape {image.shape}")
    sift = cv2.SIFT_create()
    return [detect_keypoints(s, max_keypoints, unique_locations=unique_locations, detector=sift) for s in image]
