"""Checksums of a data folder: the manifest, its verification and the content digest."""

import gzip
import hashlib
import subprocess

import pytest

from kpssl.manifest import MANIFEST, content_digest, data_files, verify_manifest, write_manifest


def test_manifest_round_trip_and_damage(tiny_acdc):
    (tiny_acdc / ".kpssl_cache").mkdir()
    (tiny_acdc / ".kpssl_cache" / "x.npz").write_bytes(b"derived")
    fingerprint = write_manifest(tiny_acdc)
    text = (tiny_acdc / MANIFEST).read_text()
    assert fingerprint == hashlib.sha256(text.encode()).hexdigest()
    assert ".kpssl_cache" not in text and len(text.splitlines()) == len(data_files(tiny_acdc)) == 15
    assert verify_manifest(tiny_acdc) == []
    assert write_manifest(tiny_acdc) == fingerprint  # the manifest does not list itself

    first = tiny_acdc / "training" / "patient001" / "patient001_frame01.nii.gz"
    first.write_bytes(first.read_bytes()[:-10])
    (tiny_acdc / "training" / "patient002" / "Info.cfg").unlink()
    (tiny_acdc / "extra.txt").write_text("new")
    assert verify_manifest(tiny_acdc) == [
        "training/patient002/Info.cfg: missing",
        "extra.txt: not in the manifest",
        "training/patient001/patient001_frame01.nii.gz: changed (sha256 differs)",
    ]


def test_manifest_is_sha256sum_compatible(tiny_acdc):
    write_manifest(tiny_acdc)
    try:
        done = subprocess.run(["sha256sum", "--quiet", "-c", MANIFEST], cwd=tiny_acdc, capture_output=True)
    except FileNotFoundError:
        pytest.skip("sha256sum not installed")
    assert done.returncode == 0


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="folder not found"):
        write_manifest(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no manifest"):
        verify_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text("not a manifest line\n")
    with pytest.raises(ValueError, match="line 1"):
        verify_manifest(tmp_path)


def test_content_digest_ignores_compression(tiny_acdc):
    path = tiny_acdc / "training" / "patient001" / "patient001_frame01.nii.gz"
    before = content_digest(path)
    recompressed = path.with_name("copy.nii.gz")
    recompressed.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()), compresslevel=1))
    assert recompressed.read_bytes() != path.read_bytes()
    assert content_digest(recompressed) == before
    other = tiny_acdc / "training" / "patient002" / "patient002_frame01.nii.gz"
    assert content_digest(other) != before
