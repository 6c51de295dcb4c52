"""One way to write a file so that no reader and no restart ever sees half of it.

:func:`atomic_write` writes to a temporary file in the destination's folder and renames it over the
destination (a rename within one file system is atomic). The temporary name is unique to the process and
the call (``.NAME.kpssl-tmp-PID-TOKEN.SUFFIXES``, hidden, with the destination's suffixes so format-sniffing
writers such as nibabel pick the same format), so two writers never collide. A process killed while
writing leaves only such a temporary; :func:`remove_stale_temporaries` deletes those of processes that no
longer run, and every run calls it on start.

Checkpoints, ``encoder.pt``, ``result.json``, ``settings.yaml``, logs, tables and NIfTI files all go
through :func:`atomic_write`.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from typing import Any, Callable

__all__ = ["temporary_name", "atomic_write", "write_text", "write_json", "remove_stale_temporaries"]

_MARK = ".kpssl-tmp-"
_TEMPORARY = re.compile(r"^\..+\.kpssl-tmp-(\d+)-[0-9a-f]+(\..*)?$")
# Names earlier versions used: ".checkpoint.pt.tmp1234", ".case.tmp1234.nii.gz", "result.json.tmp",
# "table.csv.tmp1234".
_LEGACY = re.compile(r"^(\..+\.tmp(\d+)(\..*)?|[^.].*\.(json|yaml|csv)\.tmp(\d*))$")


def temporary_name(path: str | Path) -> Path:
    """A fresh temporary path next to ``path`` with the same suffixes."""
    path = Path(path)
    suffix = "".join(path.suffixes)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    return path.with_name(f".{stem}{_MARK}{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(temporary)`` to fill a temporary file, then rename it to ``path``.

    The folder is created if needed. If ``write`` fails the temporary is removed and ``path`` is left
    as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(path)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, value: Any) -> Path:
    """Write ``value`` as indented JSON to ``path`` atomically."""
    return write_text(path, json.dumps(value, indent=2))


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporaries left in ``folder`` (not its subfolders) by processes that no longer run.

    Temporaries of running processes are kept (they may be writing right now); those of earlier
    versions' naming schemes (``.checkpoint.pt.tmp1234``, ``result.json.tmp``) are removed when their
    process is gone or they carry no process id. Returns the removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        match = _TEMPORARY.match(path.name)
        if match:
            pid = match.group(1)
        else:
            legacy = _LEGACY.match(path.name)
            if not legacy:
                continue
            pid = legacy.group(2) or legacy.group(5) or ""
        if pid and _running(int(pid)):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed
