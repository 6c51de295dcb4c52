"""Segmentation metrics: per-volume 3D Dice and HD95 (MONAI), and the paper's pooled 2D Dice.

Two views of the same predictions:

- **3D, per volume** (the clinical view): Dice of each foreground class in each volume, and the 95th
  percentile Hausdorff distance in millimetres using the voxel spacing; then averaged over volumes.
- **Pooled 2D** (the paper's view): over all slices of the held-out fold together,
  ``Dice_c = 2 sum |A_c & B_c| / (sum |A_c| + sum |B_c|)``, then the mean over foreground classes.

Conventions for empty structures (a class absent from the reference, or from the prediction): Dice is
1 when both are empty and 0 when only one is; HD95 is undefined (NaN) when either is empty and such
volumes are left out of the HD95 mean, with the count of left-out entries reported.
"""

from __future__ import annotations

import warnings

from dataclasses import dataclass, field

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance

__all__ = ["VolumeScores", "volume_scores", "PooledDice", "summarise"]


@dataclass
class VolumeScores:
    """Per-class scores of one volume (index 0 is class 1)."""

    case_id: str
    dice: np.ndarray  # (C - 1,)
    hd95: np.ndarray  # (C - 1,) mm, NaN where undefined


def _one_hot(label: np.ndarray, classes: int) -> torch.Tensor:
    tensor = torch.as_tensor(label, dtype=torch.long)
    return torch.nn.functional.one_hot(tensor, classes).movedim(-1, 0)[None].float()  # (1, C, Z, H, W)


def volume_scores(prediction: np.ndarray, reference: np.ndarray, classes: int,
                  spacing: tuple[float, float, float], case_id: str = "", *, hd95: bool = True) -> VolumeScores:
    """3D Dice and HD95 (mm) per foreground class for one volume ``(Z, H, W)`` of class indices.

    ``hd95=False`` skips the surface distances (NaN), for quick model selection."""
    if prediction.shape != reference.shape:
        raise ValueError(f"{case_id}: prediction shape {prediction.shape} differs from reference {reference.shape}")
    dice = np.empty(classes - 1)
    for c in range(1, classes):
        a, b = prediction == c, reference == c
        total = a.sum() + b.sum()
        dice[c - 1] = 1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total
    if not hd95:
        return VolumeScores(case_id, dice, np.full(classes - 1, np.nan))
    pred, ref = _one_hot(prediction, classes), _one_hot(reference, classes)
    with warnings.catch_warnings():  # empty structures are handled below, not warned about
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)  # MONAI's own deprecation notice, raised internally
        hd = compute_hausdorff_distance(pred, ref, include_background=False, percentile=95,
                                        spacing=[float(s) for s in spacing])[0].double().numpy()  # (C - 1,)
    present = np.array([(prediction == c).any() and (reference == c).any() for c in range(1, classes)])
    hd = np.where(present & np.isfinite(hd), hd, np.nan)
    return VolumeScores(case_id, dice, hd)


@dataclass
class PooledDice:
    """Accumulates per-class overlaps over many slices: the paper's pooled 2D Dice."""

    classes: int
    intersection: np.ndarray = field(init=False)
    total: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.intersection = np.zeros(self.classes - 1)
        self.total = np.zeros(self.classes - 1)

    def update(self, prediction: np.ndarray, reference: np.ndarray) -> None:
        for c in range(1, self.classes):
            a, b = prediction == c, reference == c
            self.intersection[c - 1] += np.logical_and(a, b).sum()
            self.total[c - 1] += a.sum() + b.sum()

    def per_class(self) -> np.ndarray:
        return np.where(self.total > 0, 2 * self.intersection / np.maximum(self.total, 1), 1.0)

    def mean(self) -> float:
        return float(self.per_class().mean())


def summarise(scores: list[VolumeScores], pooled: PooledDice, class_names: list[str]) -> dict:
    """Means over volumes (3D Dice, HD95) and the pooled 2D Dice, per class and over foreground classes."""
    dice = np.stack([s.dice for s in scores])  # (volumes, C - 1)
    hd = np.stack([s.hd95 for s in scores])
    finite = np.isfinite(hd)
    counts = finite.sum(0)
    hd_class = np.where(counts > 0, np.where(finite, hd, 0).sum(0) / np.maximum(counts, 1), np.nan)
    return {
        "dice_3d": float(dice.mean()),
        "dice_3d_per_class": dict(zip(class_names, dice.mean(0).round(6).tolist())),
        "hd95_mm": float(np.nanmean(hd)) if finite.any() else float("nan"),
        "hd95_mm_per_class": dict(zip(class_names, np.round(hd_class, 4).tolist())),
        "hd95_undefined": int((~finite).sum()),
        "dice_2d_pooled": pooled.mean(),
        "dice_2d_pooled_per_class": dict(zip(class_names, pooled.per_class().round(6).tolist())),
        "volumes": len(scores),
        "per_volume": [{"case": s.case_id, "dice": s.dice.round(6).tolist(),
                        "hd95": [None if np.isnan(v) else round(float(v), 4) for v in s.hd95]} for s in scores],
    }
