"""Shared fixtures: tiny data sets written in the exact ACDC and Decathlon layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kpssl.data.nifti import write_volume


def _disc_volume(rng: np.random.Generator, slices: int = 6, size: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.mgrid[:size, :size]
    label = np.zeros((slices, size, size), np.uint8)
    for z in range(slices):
        r = np.hypot(rows - size / 2, cols - size / 2)
        radius = 12 - z
        label[z][r < radius + 3] = 2
        label[z][r < radius] = 3
        label[z][(np.hypot(rows - size / 2, cols - size / 2 + radius + 4) < 5) & (label[z] == 0)] = 1
    image = (label * 50 + rng.normal(0, 5, label.shape)).astype(np.float32)
    return image, label


def write_tiny_acdc(root: Path, patients: int = 3, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for p in range(1, patients + 1):
        folder = root / "training" / f"patient{p:03d}"
        folder.mkdir(parents=True)
        (folder / "Info.cfg").write_text("ED: 1\nES: 9\nGroup: NOR\nHeight: 180.0\nNbFrame: 20\nWeight: 75.0\n")
        for frame in (1, 9):
            image, label = _disc_volume(rng)
            write_volume(folder / f"patient{p:03d}_frame{frame:02d}.nii.gz", image, (10.0, 1.5, 1.5))
            write_volume(folder / f"patient{p:03d}_frame{frame:02d}_gt.nii.gz", label, (10.0, 1.5, 1.5), label=True)
    return root


def write_tiny_decathlon(root: Path, cases: int = 3, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for c in range(cases):
        image, label = _disc_volume(rng)
        write_volume(root / "imagesTr" / f"case_{c:03d}.nii.gz", image * 10, (2.0, 0.8, 0.8))
        write_volume(root / "labelsTr" / f"case_{c:03d}.nii.gz", label, (2.0, 0.8, 0.8), label=True)
        training.append({"image": f"./imagesTr/case_{c:03d}.nii.gz", "label": f"./labelsTr/case_{c:03d}.nii.gz"})
    meta = {"name": "tiny", "labels": {"0": "background", "1": "a", "2": "b", "3": "c"}, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture
def tiny_acdc(tmp_path: Path) -> Path:
    return write_tiny_acdc(tmp_path / "acdc")


@pytest.fixture
def tiny_decathlon(tmp_path: Path) -> Path:
    return write_tiny_decathlon(tmp_path / "decathlon")
