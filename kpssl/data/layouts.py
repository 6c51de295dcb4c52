"""The folder layouts a data set can come in: ACDC and the Medical Segmentation Decathlon.

ACDC (cine cardiac MRI)::

    ROOT/[training|testing/]patientNNN/Info.cfg
                                      /patientNNN_frameNN.nii.gz      image at one cardiac phase
                                      /patientNNN_frameNN_gt.nii.gz   its labels (0 BG, 1 RV, 2 MYO, 3 LV)
                                      /patientNNN_4d.nii.gz           the whole cine (ignored)

``Info.cfg`` holds ``ED``, ``ES``, ``Group``, ``Height``, ``Weight``, ``NbFrame``; each patient gives two
cases, its end-diastolic (ED) and end-systolic (ES) frames.

Decathlon (CHD, Synapse, your own data)::

    ROOT/dataset.json      {"labels": {"0": "background", ...}, "training": [{"image": ..., "label": ...}]}
    ROOT/imagesTr/NAME.nii.gz
    ROOT/labelsTr/NAME.nii.gz

Both give a list of :class:`Case` records; everything downstream works on cases.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .nifti import DataError

__all__ = [
    "ACDC_LABELS",
    "Case",
    "AcdcPatient",
    "read_info_cfg",
    "read_dataset_json",
    "find_acdc_patients",
    "scan_acdc_folders",
    "acdc_cases",
    "decathlon_cases",
    "detect_layout",
    "find_cases",
]

ACDC_LABELS = {0: "background", 1: "RV", 2: "myocardium", 3: "LV"}
_PATIENT = re.compile(r"^patient\d{3}$")
_PATIENT_LIKE = re.compile(r"^patient", re.IGNORECASE)
LAYOUTS = ("auto", "acdc", "decathlon")
_REQUIRED_INFO = ("ED", "ES")


@dataclass(frozen=True)
class Case:
    """One labelled (or unlabelled) volume of a data set.

    ``patient`` groups cases for patient-level splits (an ACDC patient has an ED and an ES case).
    """

    case_id: str
    patient: str
    image: Path
    label: Path | None
    phase: str = ""  # "ED", "ES" for ACDC; empty otherwise
    labels: dict[int, str] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class AcdcPatient:
    patient: str
    folder: Path
    info: dict[str, str]

    @property
    def ed(self) -> int:
        return int(self.info["ED"])

    @property
    def es(self) -> int:
        return int(self.info["ES"])

    def image_path(self, frame: int) -> Path:
        return self.folder / f"{self.patient}_frame{frame:02d}.nii.gz"

    def label_path(self, frame: int) -> Path:
        return self.folder / f"{self.patient}_frame{frame:02d}_gt.nii.gz"


def read_info_cfg(path: Path) -> dict[str, str]:
    """Parse an ACDC ``Info.cfg`` (``Key: value`` lines); ED and ES must be present and integers."""
    if not path.is_file():
        raise DataError(path, "file not found")
    info: dict[str, str] = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        if ":" not in line:
            raise DataError(path, f"line {number} is not 'Key: value': {line!r}")
        key, value = line.split(":", 1)
        info[key.strip()] = value.strip()
    for key in _REQUIRED_INFO:
        if key not in info:
            raise DataError(path, f"missing {key} (the {'end-diastolic' if key == 'ED' else 'end-systolic'} frame)")
        if not info[key].isdigit():
            raise DataError(path, f"{key} must be a frame number, got {info[key]!r}")
    return info


def scan_acdc_folders(root: Path) -> tuple[list[Path], list[DataError]]:
    """The ``patientNNN`` folders under ``root``, ``root/training`` and ``root/testing``, and the problems.

    A folder whose name starts with "patient" in any case but is not ``patientNNN`` (``patient06``,
    ``Patient007``) is a problem, not something to skip: skipping it would silently lose a patient. So
    is a patient ID found twice (say in ``training/`` and ``testing/``): merging the two would mix two
    patients, or one patient's frames, across the split.
    """
    good: list[Path] = []
    problems: list[DataError] = []
    seen: dict[str, Path] = {}
    for sub in ("", "training", "testing"):
        folder = root / sub
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if not path.is_dir() or not _PATIENT_LIKE.match(path.name):
                continue
            if not _PATIENT.match(path.name):
                digits = re.findall(r"\d+", path.name)
                hint = f", e.g. patient{int(digits[0]):03d}" if digits else ""
                problems.append(DataError(path, f"misnamed patient folder: expected 'patientNNN' (lower case, "
                                                f"three digits{hint})"))
            elif path.name in seen:
                problems.append(DataError(path, f"patient ID {path.name} also at {seen[path.name]}: each patient "
                                                "must appear once (training/ and testing/ must not share IDs)"))
            else:
                seen[path.name] = path
                good.append(path)
    return good, problems


def find_acdc_patients(root: Path) -> list[AcdcPatient]:
    """All ``patientNNN`` folders under ``root``, ``root/training`` and ``root/testing``, sorted.

    Raises :class:`DataError` for a misnamed patient folder or a patient ID found twice."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "a file, not a data folder" if root.exists() else "folder not found")
    folders, problems = scan_acdc_folders(root)
    if problems:
        raise problems[0]
    return [AcdcPatient(f.name, f, read_info_cfg(f / "Info.cfg")) for f in folders]


def acdc_cases(root: Path, *, require_labels: bool = True) -> list[Case]:
    """The ED and ES cases of every ACDC patient under ``root`` (files are checked to exist)."""
    patients = find_acdc_patients(root)
    if not patients:
        raise DataError(root, "no patientNNN folders found (expected the ACDC layout)")
    cases = []
    for patient in patients:
        for phase, frame in (("ED", patient.ed), ("ES", patient.es)):
            image, label = patient.image_path(frame), patient.label_path(frame)
            if not image.is_file():
                raise DataError(image, f"file not found ({phase} frame {frame} named in Info.cfg)")
            if not label.is_file():
                if require_labels:
                    raise DataError(label, f"label file not found for {phase} frame {frame}")
                label = None
            cases.append(Case(f"{patient.patient}_{phase}", patient.patient, image, label, phase, dict(ACDC_LABELS)))
    return cases


def read_dataset_json(root: Path) -> dict:
    path = root / "dataset.json"
    if not path.is_file():
        raise DataError(path, "file not found (expected the Decathlon layout)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(path, f"not valid JSON ({error})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("labels"), dict) or not isinstance(meta.get("training"), list):
        raise DataError(path, "expected keys 'labels' (a mapping) and 'training' (a list)")
    return meta


def decathlon_cases(root: Path, *, require_labels: bool = True) -> list[Case]:
    """The training cases listed in ``root/dataset.json`` (one patient per case)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "a file, not a data folder" if root.exists() else "folder not found")
    meta = read_dataset_json(root)
    try:
        labels = {int(k): str(v) for k, v in meta["labels"].items()}
    except ValueError:
        raise DataError(root / "dataset.json", "label keys must be integers") from None
    if not meta["training"]:
        raise DataError(root / "dataset.json", "the 'training' list is empty")
    cases = []
    seen: dict[str, Path] = {}
    for entry in meta["training"]:
        if not isinstance(entry, dict) or "image" not in entry:
            raise DataError(root / "dataset.json", f"training entry without 'image': {entry!r}")
        image = (root / entry["image"]).resolve()
        label = (root / entry["label"]).resolve() if entry.get("label") else None
        if not image.is_file():
            raise DataError(image, "file not found (listed in dataset.json)")
        if label is None or not label.is_file():
            if require_labels:
                raise DataError(label or image, "label file not found (listed in dataset.json)")
            label = None
        name = image.name.split(".")[0]
        if name in seen:
            raise DataError(root / "dataset.json", f"case {name!r} listed twice ({seen[name]} and {image})")
        seen[name] = image
        cases.append(Case(name, name, image, label, "", labels))
    return cases


def detect_layout(root: Path) -> str:
    """``"decathlon"`` if ``dataset.json`` exists, ``"acdc"`` if patient folders exist."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "a file, not a data folder" if root.exists() else "folder not found")
    if (root / "dataset.json").is_file():
        return "decathlon"
    if any(p.is_dir() and _PATIENT_LIKE.match(p.name) for sub in ("", "training", "testing")
           if (root / sub).is_dir() for p in (root / sub).iterdir()):
        return "acdc"
    raise DataError(root, "neither an ACDC layout (patientNNN folders) nor a Decathlon layout (dataset.json)")


def find_cases(root: Path, layout: str | None = None, *, require_labels: bool = True) -> list[Case]:
    """Cases of the data set under ``root``; the layout is detected unless given (or ``"auto"``)."""
    if layout not in LAYOUTS and layout is not None:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    layout = detect_layout(Path(root)) if layout in (None, "auto") else layout
    if layout == "acdc":
        return acdc_cases(Path(root), require_labels=require_labels)
    if layout == "decathlon":
        return decathlon_cases(Path(root), require_labels=require_labels)
    raise ValueError(f"unknown layout {layout!r}; expected 'acdc' or 'decathlon'")
