"""Validate a data set folder before anything trains on it (``kpssl check DIR``).

Every problem is reported as one line naming the file, and the check goes on to find the rest, so a user
fixes everything in one pass. The summary tells what was found. Reported: missing or unreadable files,
bad ``Info.cfg`` and ``dataset.json``, misnamed patient folders (``patient06``, ``Patient007``), a patient
ID found twice (``training/`` and ``testing/``), images with non-finite, absurd or constant intensities,
labels that disagree with their image or hold values outside the label set.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .layouts import ACDC_LABELS, AcdcPatient, detect_layout, read_dataset_json, read_info_cfg, scan_acdc_folders
from .nifti import DataError, read_volume

__all__ = ["CheckReport", "check_folder"]


@dataclass
class CheckReport:
    root: Path
    layout: str = "unknown"
    patients: int = 0
    cases: int = 0
    slices: list[int] = field(default_factory=list)
    spacings: list[tuple[float, float, float]] = field(default_factory=list)
    shapes: list[tuple[int, int, int]] = field(default_factory=list)
    label_counts: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        lines = [f"{self.root}: {self.layout} layout, {self.patients} patients, {self.cases} labelled volumes"]
        if self.shapes:
            spacing = np.asarray(self.spacings)
            rows = [s[1] for s in self.shapes]
            cols = [s[2] for s in self.shapes]
            lines.append(f"  slices per volume {min(self.slices)}-{max(self.slices)}, in-plane size "
                         f"{min(rows)}-{max(rows)} x {min(cols)}-{max(cols)} px")
            low, high = (tuple(round(float(v), 2) for v in values) for values in (spacing.min(0), spacing.max(0)))
            lines.append(f"  spacing (z, row, col) mm: min {low}, max {high}")
            total = sum(self.label_counts.values())
            shares = ", ".join(f"{k}: {100 * v / total:.2f}%" for k, v in sorted(self.label_counts.items()))
            lines.append(f"  label voxels {shares}")
        lines.append("  OK" if self.ok else f"  {len(self.problems)} problem(s)")
        return "\n".join(lines)


def _check_pair(report: CheckReport, image_path: Path, label_path: Path, allowed: set[int]) -> None:
    try:
        image = read_volume(image_path)
    except DataError as error:
        report.problems.append(str(error))
        return
    low, high = float(image.array.min()), float(image.array.max())
    if low == high:
        report.problems.append(f"{image_path}: image is constant (every voxel is {low:g}): nothing to learn or segment")
    try:
        label = read_volume(label_path, label=True)
    except DataError as error:
        report.problems.append(str(error))
        return
    if label.shape != image.shape:
        report.problems.append(f"{label_path}: label shape {label.shape} differs from image shape {image.shape} "
                               f"({image_path.name})")
        return
    if not np.allclose(label.spacing, image.spacing, rtol=1e-3, atol=1e-4):
        report.problems.append(f"{label_path}: label spacing {tuple(round(s, 4) for s in label.spacing)} differs "
                               f"from image spacing {tuple(round(s, 4) for s in image.spacing)}")
    values, counts = np.unique(label.array, return_counts=True)
    bad = sorted(set(values.tolist()) - allowed)
    if bad:
        report.problems.append(f"{label_path}: label values {bad} outside the allowed set {sorted(allowed)}")
    report.cases += 1
    report.slices.append(image.shape[0])
    report.shapes.append(image.shape)
    report.spacings.append(image.spacing)
    report.label_counts.update(dict(zip(values.tolist(), counts.tolist())))


def _check_acdc(report: CheckReport) -> None:
    folders, folder_problems = scan_acdc_folders(report.root)
    report.problems.extend(str(problem) for problem in folder_problems)
    patients = []
    for folder in folders:
        try:
            patients.append(AcdcPatient(folder.name, folder, read_info_cfg(folder / "Info.cfg")))
        except DataError as error:
            report.problems.append(str(error))
    report.patients = len(folders)
    for patient in patients:
        for phase, frame in (("ED", patient.ed), ("ES", patient.es)):
            image, label = patient.image_path(frame), patient.label_path(frame)
            missing = [p for p in (image, label) if not p.is_file()]
            for path in missing:
                kind = "image" if path == image else "label file"
                report.problems.append(f"{path}: {kind} not found ({phase} frame {frame} named in Info.cfg)")
            if not missing:
                _check_pair(report, image, label, set(ACDC_LABELS))


def _check_decathlon(report: CheckReport) -> None:
    root = report.root
    try:
        meta = read_dataset_json(root)
        allowed = {int(k) for k in meta["labels"]}
    except (DataError, ValueError) as error:
        report.problems.append(str(error))
        return
    entries = meta["training"]
    report.patients = len(entries)
    if not entries:
        report.problems.append(f"{root / 'dataset.json'}: the 'training' list is empty")
    seen: dict[str, Path] = {}
    for entry in entries:
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            report.problems.append(f"{root / 'dataset.json'}: training entry needs 'image' and 'label': {entry!r}")
            continue
        image, label = (root / entry["image"]).resolve(), (root / entry["label"]).resolve()
        name = image.name.split(".")[0]
        if name in seen:
            report.problems.append(f"{root / 'dataset.json'}: case {name!r} listed twice ({seen[name]} and {image})")
            continue
        seen[name] = image
        missing = [p for p in (image, label) if not p.is_file()]
        for path in missing:
            report.problems.append(f"{path}: file not found (listed in dataset.json)")
        if not missing:
            _check_pair(report, image, label, allowed)


def check_folder(root: str | Path) -> CheckReport:
    """Check an ACDC-layout or Decathlon-layout folder; never raises for data problems, reports them."""
    report = CheckReport(Path(root))
    try:
        report.layout = detect_layout(report.root)
    except DataError as error:
        report.problems.append(str(error))
        return report
    (_check_acdc if report.layout == "acdc" else _check_decathlon)(report)
    if report.layout == "acdc" and not report.problems and report.cases == 0:
        report.problems.append(f"{report.root}: no labelled volumes found")
    return report
