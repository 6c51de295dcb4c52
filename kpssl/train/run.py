"""A run folder knows what run it holds, and refuses to become another one.

Every pretraining, fine-tuning and experiment folder carries ``run.json``::

    {"identity": {"kind": "finetune", "method": "kaf", "fold": 0, "labeled": 2,
                  "data": "3f0c...", "layout": "acdc", "encoder": "9be1...",
                  "settings": {...}, "settings_hash": "71ad..."},
     "settings": {... the full settings, preset name included ...},
     "commands": [{"command": "kpssl finetune ...", "time": "...", "code": {"version": ..., "commit": ...},
                   "changes": {}}, ...]}

The identity holds what determines the run's result: the kind and method, the data (a fingerprint of
the case files: relative paths and sizes), the fold and label budget, the pretrained encoder (a
fingerprint of its weights) and the settings that the kind of run reads (a pretraining does not read
``finetune.*``, so an experiment rerun with other fine-tuning settings reuses its pretrainings).
:func:`claim_run` compares a folder's identity with the one asked for before any work starts and
refuses a mismatch with a message naming each differing key. Only a few changes are safe for a run
under way (more epochs); they must be asked for (``allow_change``, ``--allow-change KEY``) and are
recorded with the command that made them. The code version is recorded, not compared.

Atomic writes (:mod:`kpssl.atomic`) are the run folder's only way to write, and stale temporaries of
killed processes are removed when a run claims its folder.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..atomic import atomic_write, remove_stale_temporaries, write_json, write_text
from ..data.layouts import Case, detect_layout

__all__ = [
    "RUN_FILE", "RESULT_FILES", "SAFE_CHANGES", "RunError", "RunIdentity", "data_fingerprint",
    "weights_fingerprint", "code_version", "read_json", "read_run", "legacy_identity", "identity_differences",
    "describe_differences", "relevant_settings", "claim_run", "check_output_folder", "atomic_write", "write_json", "write_text",
    "remove_stale_temporaries",
]

RUN_FILE = "run.json"
RESULT_FILES = ("checkpoint.pt", "result.json", "encoder.pt", "best.pt")
SAFE_CHANGES = ("pretrain.epochs", "finetune.epochs")  # may grow on resume when asked for
GROUPS = {  # the settings each kind of run reads
    "pretrain": ("seed", "data", "keypoints", "augment", "model", "pretrain"),
    "finetune": ("seed", "data", "keypoints", "augment", "model", "finetune", "splits"),
    "experiment": ("seed", "data", "keypoints", "augment", "model", "pretrain", "finetune", "splits"),
}
# No influence on a run's numbers: how the layout is named, worker processes, and the preset's list of
# label budgets (a fine-tuning run is given its M).
NEUTRAL = {"data.layout", "pretrain.workers", "finetune.workers", "splits.labeled"}


class RunError(ValueError):
    """A run folder holds another run, or a file in it is unreadable; the message names the file."""


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def relevant_settings(kind: str, settings: dict) -> dict[str, Any]:
    """The settings (a ``Settings.to_dict()``) that a run of ``kind`` reads, flattened to dotted names,
    without the neutral ones."""
    flat = _flatten({group: settings[group] for group in GROUPS[kind] if group in settings})
    return {k: v for k, v in flat.items() if k not in NEUTRAL}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class RunIdentity:
    """What a run is. ``settings`` holds only the groups its kind reads (:data:`GROUPS`)."""

    kind: str
    method: str
    data: str
    layout: str
    settings: dict
    fold: int | None = None
    labeled: int | None = None
    encoder: str | None = None
    extra: dict = field(default_factory=dict)  # e.g. the experiment's pretraining scope

    @classmethod
    def of(cls, kind: str, method: str, settings, cases: Sequence[Case], root: Path, **keys: Any) -> "RunIdentity":
        full = settings.to_dict()
        relevant = {group: full[group] for group in GROUPS[kind]}
        return cls(kind, method, data_fingerprint(cases, root), _layout(root, cases), relevant, **keys)

    @property
    def settings_hash(self) -> str:
        return _digest({k: v for k, v in _flatten(self.settings).items() if k not in NEUTRAL})

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "method": self.method, "fold": self.fold, "labeled": self.labeled,
                "data": self.data, "layout": self.layout, "encoder": self.encoder, **self.extra,
                "settings": self.settings, "settings_hash": self.settings_hash}

    def keys(self) -> dict[str, Any]:
        """Every compared key, settings flattened to dotted names."""
        head = {k: v for k, v in self.to_dict().items() if k not in ("settings", "settings_hash")}
        return {**head, **_flatten(self.settings)}


def _layout(root: Path, cases: Sequence[Case]) -> str:
    try:
        return detect_layout(root)
    except Exception:  # a list of cases from elsewhere
        return "cases"


def data_fingerprint(cases: Iterable[Case], root: str | Path) -> str:
    """A fingerprint of a data set's cases: patient, case, and the relative path and size of each file.

    Cheap (no file is read) and independent of where the data folder lies; any added, removed,
    renamed or rewritten-to-another-size file changes it."""
    root = Path(root).resolve()
    entries = []
    for case in cases:
        files = []
        for path in (case.image, case.label):
            if path is None:
                files.append(None)
                continue
            path = Path(path).resolve()
            try:
                name = str(path.relative_to(root))
            except ValueError:
                name = path.name
            files.append([name, path.stat().st_size if path.is_file() else -1])
        entries.append([case.patient, case.case_id, files])
    return _digest(sorted(entries, key=str))


def weights_fingerprint(path: str | Path) -> str:
    """A fingerprint of a checkpoint's ``model`` tensors (names, shapes, dtypes and values)."""
    import torch

    from .common import load_checkpoint

    state = load_checkpoint(path)
    if not isinstance(state, dict) or "model" not in state:
        raise RunError(f"{path}: holds no model weights")
    digest = hashlib.sha256()
    for name in sorted(state["model"]):
        tensor = state["model"][name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def code_version() -> dict[str, str]:
    """The package version and the git commit of the checkout the package was imported from."""
    from .. import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"version": __version__, "commit": commit}


def read_json(path: str | Path, required: Sequence[str] = ()) -> dict:
    """Read a JSON object, raising :class:`RunError` naming the file if it is truncated, empty, not an
    object or lacks a ``required`` key."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except OSError as error:
        raise RunError(f"{path}: cannot be read ({error.strerror})") from None
    except json.JSONDecodeError as error:
        raise RunError(f"{path}: not valid JSON, truncated or corrupted ({error.msg} at line {error.lineno}); "
                       "delete the file (its run will be redone) or the folder") from None
    if not isinstance(value, dict):
        raise RunError(f"{path}: expected a JSON object, got {type(value).__name__}")
    missing = [key for key in required if key not in value]
    if missing:
        raise RunError(f"{path}: incomplete, lacks {', '.join(missing)}; delete the file (its run will be redone) "
                       "or the folder")
    return value


def read_run(folder: str | Path) -> dict | None:
    """The folder's ``run.json`` record, or ``None`` if it has none."""
    path = Path(folder) / RUN_FILE
    if not path.exists():
        return None
    return read_json(path, ("identity", "commands"))


def legacy_identity(folder: Path) -> dict | None:
    """What a folder written before ``run.json`` existed says about itself (its result or checkpoint)."""
    for name in ("result.json", "checkpoint.pt"):
        path = folder / name
        if not path.is_file():
            continue
        if name == "result.json":
            record = read_json(path)
        else:
            from .common import load_checkpoint

            record = load_checkpoint(path)
        if "settings" not in record:
            continue
        known = {k: record[k] for k in ("method", "fold") if k in record}
        if "labeled" in record:
            known["labeled"] = record["labeled"]
        return {**known, "settings": record["settings"]}
    return None


def identity_differences(stored: dict, wanted: RunIdentity) -> dict[str, tuple[Any, Any]]:
    """``{key: (stored value, wanted value)}`` for every compared key that differs.

    Keys the stored record does not hold (a folder from before this record existed) are not compared;
    neutral settings (worker counts, the layout's spelling) never are."""
    flat = {k: v for k, v in stored.items() if k not in ("settings", "settings_hash")}
    flat.update(_flatten(stored.get("settings", {})))
    differences = {}
    for key, value in wanted.keys().items():
        if key in NEUTRAL or key not in flat:
            continue
        if flat[key] != value:
            differences[key] = (flat[key], value)
    return differences


def describe_differences(differences: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} ({json.dumps(a)} -> {json.dumps(b)})" for k, (a, b) in sorted(differences.items()))


def check_output_folder(path: str | Path, option: str = "--out") -> Path:
    """Refuse an output folder that is an existing file or lies under one, before any work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunError(f"{option} {path}: exists and is not a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunError(f"{option} {path}: {parent} is a file, not a folder")
            break
    return path


def claim_run(
    out: str | Path,
    identity: RunIdentity,
    *,
    resume: bool,
    allow_change: Iterable[str] = (),
    command: str | None = None,
    settings=None,
    write: bool = True,
) -> dict:
    """Make ``out`` the folder of the run ``identity``, or refuse with a message naming what differs.

    A folder holding results (checkpoint, result, encoder) is continued only with ``resume`` and only if
    its identity equals ``identity``, except for the keys in ``allow_change`` (each one of
    :data:`SAFE_CHANGES`, and only growing), which are then recorded. A folder without results is
    (re)started. Stale temporaries are removed. ``write=False`` (other processes of a distributed run)
    checks without writing. Returns the folder's updated record.
    """
    out = check_output_folder(out)
    allow = set(allow_change)
    unsafe = sorted(allow - set(SAFE_CHANGES))
    if unsafe:
        raise RunError(f"--allow-change {unsafe[0]}: only {', '.join(SAFE_CHANGES)} may change in a run under way")
    record = read_run(out) if out.is_dir() else None
    has_results = out.is_dir() and any((out / name).exists() for name in RESULT_FILES)
    changes: dict[str, list] = {}
    if has_results:
        if not resume:
            raise RunError(f"{out}: holds a previous run; pass resume=True (--resume) or choose another folder")
        stored = record["identity"] if record else legacy_identity(out)
        differences = identity_differences(stored, identity) if stored else {}
        for key in sorted(set(differences) & allow):
            old, new = differences[key]
            if isinstance(old, int) and isinstance(new, int) and new > old:
                changes[key] = [old, new]
                del differences[key]
        if differences:
            source = out / RUN_FILE if record else out
            hint = ("; only " + " or ".join(SAFE_CHANGES) + " may grow, with --allow-change KEY"
                    if set(differences) & set(SAFE_CHANGES) else "")
            raise RunError(f"{source}: this folder holds another run, which differs in "
                           f"{describe_differences(differences)}. Choose another folder for the new run{hint}")
    else:
        record = None  # nothing to keep: a folder whose run never reached its first checkpoint starts over
    entry = {"command": command or "python API", "time": datetime.datetime.now().astimezone().isoformat(
        timespec="seconds"), "code": code_version(), "changes": changes}
    record = {"identity": identity.to_dict(), "settings": None if settings is None else settings.to_dict(),
              "commands": [*(record or {}).get("commands", []), entry]}
    if write:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        write_json(out / RUN_FILE, record)
    return record
