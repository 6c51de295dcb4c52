"""Preprocessed volumes in memory, and 2D slice datasets over them.

A slice knows where it sits in its volume: its *position* ``(index + 1) / count`` (the PCL label) and
its *partition* ``floor(index * S / count)`` (the GCL label, S = 4 equal partitions).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..settings import DataSettings, SplitSettings
from .layouts import Case, find_cases
from .nifti import DataError, read_volume
from .preprocess import center_pad_crop, preprocess_volume
from .splits import FoldSplit, fold_split

__all__ = [
    "PreparedVolume",
    "slice_position",
    "slice_partition",
    "prepare_case",
    "load_volumes",
    "slice_index",
    "LabelledSlices",
    "FoldCases",
    "fold_cases",
]


@dataclass
class PreparedVolume:
    """One preprocessed volume: ``image (Z, H, W)`` float32 z-scored, ``label (Z, H, W)`` int64 or None."""

    case: Case
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, float, float]

    @property
    def case_id(self) -> str:
        return self.case.case_id

    @property
    def patient(self) -> str:
        return self.case.patient

    @property
    def slices(self) -> int:
        return self.image.shape[0]


def slice_position(index: int | np.ndarray, count: int) -> float | np.ndarray:
    """PCL position of slice ``index`` (0-based) in a volume of ``count`` slices: ``(index + 1) / count``."""
    return (np.asarray(index) + 1) / count if np.ndim(index) else (index + 1) / count


def slice_partition(index: int | np.ndarray, count: int, partitions: int = 4) -> int | np.ndarray:
    """GCL partition (0 .. S-1) of slice ``index``: the volume cut into ``partitions`` equal parts."""
    part = np.minimum((np.asarray(index) * partitions) // count, partitions - 1)
    return part if np.ndim(index) else int(part)


def prepare_case(case: Case, settings: DataSettings, *, labels: bool = True) -> PreparedVolume:
    """Read and preprocess one case; checks that image and label agree and label values are allowed.

    A constant image (every voxel the same value) is refused: it normalises to an all-zero volume that
    pretraining would silently learn nothing from."""
    image = read_volume(case.image)
    low, high = float(image.array.min()), float(image.array.max())
    if low == high:
        raise DataError(case.image, f"image is constant (every voxel is {low:g}): nothing to learn or segment")
    label = None
    if labels and case.label is not None:
        label_volume = read_volume(case.label, label=True)
        if label_volume.shape != image.shape:
            raise DataError(case.label, f"label shape {label_volume.shape} differs from image shape {image.shape} "
                                        f"({case.image.name})")
        if not np.allclose(label_volume.spacing, image.spacing, rtol=1e-3, atol=1e-4):
            raise DataError(case.label, f"label spacing {label_volume.spacing} differs from image spacing "
                                        f"{image.spacing} ({case.image.name})")
        allowed = set(case.labels) if case.labels else set(range(settings.classes))
        found = set(np.unique(label_volume.array).tolist())
        if not found <= allowed:
            raise DataError(case.label, f"label values {sorted(found - allowed)} outside the allowed set {sorted(allowed)}")
        label = label_volume.array
    try:
        out_image, out_label, spacing = preprocess_volume(image.array, label, image.spacing, settings)
    except ValueError as error:
        raise DataError(case.image, f"preprocessing failed ({error})") from None
    if not out_image.any():
        raise DataError(case.image, "the preprocessed image is all zeros (constant after clipping?)")
    return PreparedVolume(case, out_image, None if out_label is None else out_label.astype(np.int64), spacing)


def load_volumes(
    root: str | Path | Sequence[Case], settings: DataSettings, *, labels: bool = True, patients: Iterable[str] | None = None
) -> list[PreparedVolume]:
    """Read and preprocess the cases of a data set folder (or a list of cases), optionally only some patients."""
    cases = find_cases(Path(root), settings.layout, require_labels=labels) if isinstance(root, (str, Path)) \
        else list(root)
    if patients is not None:
        wanted = set(patients)
        missing = wanted - {c.patient for c in cases}
        if missing:
            raise ValueError(f"patients not in the data set: {', '.join(sorted(missing))}")
        cases = [c for c in cases if c.patient in wanted]
    return [prepare_case(c, settings, labels=labels) for c in cases]


@dataclass
class FoldCases:
    """The cases of a data set and one fold's patient split, with the cases of any group of patients."""

    cases: list[Case]
    split: FoldSplit

    @property
    def patients(self) -> list[str]:
        return sorted({c.patient for c in self.cases})

    def of(self, patients: Iterable[str]) -> list[Case]:
        """The cases of ``patients``, in the order given (a patient's cases in data set order)."""
        return [c for p in patients for c in self.cases if c.patient == p]

    def volumes(self, patients: Iterable[str], settings: DataSettings, *, labels: bool = True) -> list[PreparedVolume]:
        """Read and preprocess the cases of ``patients``."""
        return load_volumes(self.of(patients), settings, labels=labels)

    def class_names(self, classes: int) -> list[str]:
        """Names of the foreground classes 1 .. classes - 1 (from the data set's label table)."""
        return [self.cases[0].labels.get(c, str(c)) for c in range(1, classes)]


def fold_cases(root: str | Path, data: DataSettings, splits: SplitSettings, fold: int, *,
               require_labels: bool = True) -> FoldCases:
    """The data set's cases under ``root`` and fold ``fold``'s split of its patients (``train``,
    ``validation``, ``test``): the one way to get a fold's cases and volumes."""
    cases = find_cases(Path(root), data.layout, require_labels=require_labels)
    return FoldCases(cases, fold_split(sorted({c.patient for c in cases}), fold, splits))


def slice_index(volumes: Sequence[PreparedVolume]) -> np.ndarray:
    """All ``(volume, slice)`` pairs, shape ``(N, 2)`` int64, in volume then slice order."""
    pairs = [(v, z) for v, volume in enumerate(volumes) for z in range(volume.slices)]
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


class LabelledSlices(Dataset):
    """Centre-cropped labelled slices for supervised training and evaluation (no keypoints).

    Each item is a dict: ``image (1, P, P)`` float32, ``label (P, P)`` int64, ``position``,
    ``partition``, ``volume``, ``slice``. The keypoint-aware datasets live in :mod:`kpssl.keypoints`.
    """

    def __init__(self, volumes: Sequence[PreparedVolume], settings: DataSettings):
        if any(v.label is None for v in volumes):
            raise ValueError("LabelledSlices needs volumes with labels")
        self.volumes = list(volumes)
        self.settings = settings
        self.index = slice_index(self.volumes)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        v, z = self.index[item]
        volume = self.volumes[v]
        image, _ = center_pad_crop(volume.image[z], self.settings.patch, fill=float(volume.image.min()))
        label, _ = center_pad_crop(volume.label[z], self.settings.patch)
        count = volume.slices
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image))[None],  # (1, P, P)
            "label": torch.from_numpy(np.ascontiguousarray(label)),  # (P, P)
            "position": torch.tensor(slice_position(int(z), count), dtype=torch.float32),
            "partition": torch.tensor(slice_partition(int(z), count, self.settings.partitions)),
            "volume": torch.tensor(int(v)),
            "slice": torch.tensor(int(z)),
        }
