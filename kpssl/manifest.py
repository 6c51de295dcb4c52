"""Checksums of a data folder: are two sites using the same data?

``write_manifest`` records the SHA-256 of every file in ``SHA256SUMS`` (the format of the
``sha256sum`` tool, so ``sha256sum -c SHA256SUMS`` verifies it anywhere) and returns a fingerprint, the
digest of the manifest itself, to compare across sites. Hidden files and folders (the keypoint cache
``.kpssl_cache/``) are derived data and left out. ``content_digest`` hashes a volume's decoded voxels,
dtype, shape and spacing, for data each site converted itself, whose compressed bytes may differ.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

__all__ = ["MANIFEST", "sha256_file", "data_files", "write_manifest", "verify_manifest", "content_digest"]

MANIFEST = "SHA256SUMS"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def data_files(root: Path) -> list[Path]:
    """Every file under ``root`` except hidden ones and the manifest, sorted."""
    root = Path(root)
    return sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.name != MANIFEST
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def write_manifest(root: Path) -> str:
    """Write ``root/SHA256SUMS``; return the fingerprint (the manifest's own SHA-256)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: folder not found")
    text = "".join(f"{sha256_file(p)}  {p.relative_to(root).as_posix()}\n" for p in data_files(root))
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(text)
    tmp.replace(root / MANIFEST)
    return hashlib.sha256(text.encode()).hexdigest()


def verify_manifest(root: Path) -> list[str]:
    """One line per file that is missing, changed or not in the manifest; empty when all agree."""
    root = Path(root)
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: no manifest; write one with write_manifest")
    recorded: dict[str, str] = {}
    for number, line in enumerate(manifest.read_text().splitlines(), start=1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise ValueError(f"{manifest}: line {number} is not 'SHA256  NAME': {line!r}")
        recorded[name] = digest
    present = {p.relative_to(root).as_posix(): p for p in data_files(root)}
    problems = [f"{name}: missing" for name in sorted(set(recorded) - set(present))]
    problems += [f"{name}: not in the manifest" for name in sorted(set(present) - set(recorded))]
    problems += [f"{name}: changed (sha256 differs)" for name in sorted(set(recorded) & set(present))
                 if sha256_file(present[name]) != recorded[name]]
    return problems


def content_digest(path: Path, label: bool = False) -> str:
    """SHA-256 of a volume's decoded voxels, dtype, shape and spacing (blind to compression)."""
    from .data import read_volume

    volume = read_volume(path, label=label)
    digest = hashlib.sha256(str((volume.array.dtype.str, volume.shape, volume.spacing)).encode())
    digest.update(np.ascontiguousarray(volume.array).tobytes())
    return digest.hexdigest()
