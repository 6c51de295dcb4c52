"""Keypoints and correspondences computed once per volume and kept beside the data.

The book's page of deviations lists "SIFT recomputed for every sample at every step" among the authors' costs. Here SIFT
runs once per slice of a data set and its result is stored in ``<data root>/.kpssl_cache/``::

    keypoints/<key>.npz            every slice of one volume: counts (Z,), points, descriptors, responses
    matches/<key>-<mkey>.npz       match12 of every ordered slice pair the neighbour rule can draw

``key`` hashes the preprocessed image (its bytes, shape and dtype, so preprocessing settings are covered),
the detection settings (``max_keypoints``) and the detector version (OpenCV's version included); ``mkey``
adds the radii and the neighbour rule. Changing any of them changes the file name, so a stale entry is
never read. Each file also stores its key; a file that cannot be read, has the wrong key, or has arrays of
the wrong shape, type or range is reported with a warning and rebuilt. Files are written to a unique
temporary name in the same folder and renamed (atomic, safe with several DataLoader workers).

:class:`KeypointCache` does the disk work (its constructor touches nothing); :class:`VolumeKeypoints` is
what it returns, and memoises correspondences asked for outside the stored pairs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..data.slices import PreparedVolume
from ..settings import DataSettings, KeypointSettings, Settings
from .correspond import match_slices, neighbour_pairs
from .detect import DESCRIPTOR_DIM, DETECTOR_VERSION, SliceKeypoints, detect_volume

__all__ = ["CACHE_FOLDER", "VolumeKeypoints", "KeypointCache", "default_cache_dir", "fill_cache", "load_all"]

CACHE_FOLDER = ".kpssl_cache"
_FORMAT = "kpssl-keypoint-cache-v1"
_MATCH_FORMAT = "kpssl-match-cache-v1"


class _CorruptEntry(Exception):
    """A cache file exists but must not be used (the message says why)."""


def default_cache_dir(data_root: str | Path) -> Path:
    """Where the cache of the data set under ``data_root`` lives: ``data_root/.kpssl_cache``."""
    return Path(data_root) / CACHE_FOLDER


@dataclass
class VolumeKeypoints:
    """The keypoints of every slice of one volume and their correspondences.

    ``slices[z]`` is slice ``z``'s :class:`SliceKeypoints`; ``matches[(z1, z2)]`` the ``match12 (n_z1,)``
    int64 of that ordered pair (``-1`` unmatched), filled on demand by :meth:`match12`.
    """

    key: str
    slices: list[SliceKeypoints]
    radius_forward: float
    radius_reverse: float
    matches: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    computed: bool = True  # False when the keypoints were read from a valid cache file

    def match12(self, first: int, second: int) -> np.ndarray:
        """``match12 (n_first,)`` int64 between slices ``first`` and ``second`` (computed once)."""
        pair = (int(first), int(second))
        if pair not in self.matches:
            self.matches[pair] = match_slices(self.slices[pair[0]], self.slices[pair[1]],
                                              self.radius_forward, self.radius_reverse).match12
        return self.matches[pair]


def _hash(*parts: bytes | str | memoryview) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` to a unique temporary file in the same folder, then an atomic rename.

    A folder that cannot be written (read-only data) gives a warning; the result then lives in memory only.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError as error:
        warnings.warn(f"{path}: cannot write the keypoint cache ({error.strerror or error}); keeping it in memory",
                      RuntimeWarning, stacklevel=4)
        return
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, **arrays)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _read_npz(path: Path, key: str) -> dict[str, np.ndarray]:
    """All arrays of a cache file whose stored key is ``key``; raises :class:`_CorruptEntry` otherwise."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as error:
        raise _CorruptEntry(f"unreadable ({type(error).__name__}: {error})") from None
    stored = arrays.get("key")
    if stored is None or stored.shape != () or str(stored) != key:
        raise _CorruptEntry(f"stored key {None if stored is None else str(stored)!r} differs from {key!r}")
    return arrays


def _expect(condition: bool, problem: str) -> None:
    if not condition:
        raise _CorruptEntry(problem)


class KeypointCache:
    """SIFT keypoints and slice correspondences of volumes, stored beside the data (or nowhere).

    Args:
        root: the data set's folder; files go to ``root/.kpssl_cache`` (:func:`default_cache_dir`).
            None (and no ``directory``): compute everything in memory and write nothing.
        keypoints: detection (``max_keypoints``) and correspondence (radii) settings.
        data: the neighbour rule, which decides the slice pairs whose correspondences are stored.
        directory: store in this folder instead of ``root/.kpssl_cache`` (e.g. for read-only data).

    The settings may be left out when the cache is handed to a dataset, which binds its own
    (:meth:`bind`). ``load(volume)`` returns a :class:`VolumeKeypoints`, reading valid files and
    (re)building the rest. The constructor touches nothing on disk.
    """

    def __init__(self, root: str | Path | None = None, keypoints: KeypointSettings | None = None,
                 data: DataSettings | None = None, *, directory: str | Path | None = None):
        if keypoints is not None and keypoints.max_keypoints < 0:
            raise ValueError(f"max_keypoints must be >= 0, got {keypoints.max_keypoints}")
        if data is not None and data.neighbour_rule not in ("adjacent", "fraction"):
            raise ValueError(f"unknown neighbour rule {data.neighbour_rule!r}; expected 'adjacent' or 'fraction'")
        if (keypoints is None) != (data is None):
            raise ValueError("give both keypoint and data settings, or neither (a dataset binds its own)")
        if directory is not None:
            self.directory: Path | None = Path(directory)
        else:
            self.directory = None if root is None else default_cache_dir(root)
        self.keypoint_settings = keypoints
        self.data_settings = data

    def bind(self, keypoints: KeypointSettings, data: DataSettings) -> "KeypointCache":
        """This cache with settings: itself if they agree, a copy if it had none; else ``ValueError``."""
        if self.keypoint_settings is None:
            return KeypointCache(keypoints=keypoints, data=data, directory=self.directory)
        if self.keypoint_settings != keypoints:
            raise ValueError(f"the cache was made for {self.keypoint_settings}, the dataset uses {keypoints}")
        if (self.data_settings.neighbour_rule, self.data_settings.neighbour_fraction) != \
                (data.neighbour_rule, data.neighbour_fraction):
            raise ValueError(f"the cache was made for neighbour rule {self.data_settings.neighbour_rule!r} "
                             f"({self.data_settings.neighbour_fraction}), the dataset uses {data.neighbour_rule!r} "
                             f"({data.neighbour_fraction})")
        return self

    def _settings(self) -> tuple[KeypointSettings, DataSettings]:
        if self.keypoint_settings is None or self.data_settings is None:
            raise ValueError("this KeypointCache has no settings: pass keypoint and data settings, or bind() it")
        return self.keypoint_settings, self.data_settings

    def __repr__(self) -> str:
        k = None if self.keypoint_settings is None else self.keypoint_settings.max_keypoints
        return f"KeypointCache(directory={None if self.directory is None else str(self.directory)!r}, K={k})"

    # --- keys ------------------------------------------------------------------------------------
    def keypoint_key(self, volume: PreparedVolume) -> str:
        """Hash of the preprocessed image and the detection settings (module docstring)."""
        image = np.ascontiguousarray(volume.image)
        settings = json.dumps({"max_keypoints": self._settings()[0].max_keypoints})
        return _hash(_FORMAT, DETECTOR_VERSION, settings, str(image.shape), image.dtype.str, memoryview(image).cast("B"))

    def match_key(self, keypoint_key: str) -> str:
        k, d = self._settings()
        fraction = d.neighbour_fraction if d.neighbour_rule == "fraction" else None
        settings = json.dumps({"forward": float(k.radius_forward), "reverse": float(k.radius_reverse),
                               "rule": d.neighbour_rule, "fraction": fraction})
        return _hash(_MATCH_FORMAT, keypoint_key, settings)[:16]

    def keypoint_path(self, key: str) -> Path:
        if self.directory is None:
            raise ValueError("this cache keeps nothing on disk (directory None)")
        return self.directory / "keypoints" / f"{key}.npz"

    def match_path(self, key: str) -> Path:
        if self.directory is None:
            raise ValueError("this cache keeps nothing on disk (directory None)")
        return self.directory / "matches" / f"{key}-{self.match_key(key)}.npz"

    # --- loading ---------------------------------------------------------------------------------
    def load(self, volume: PreparedVolume, *, pairs: bool = True) -> VolumeKeypoints:
        """Keypoints (and, with ``pairs``, the rule's correspondences) of ``volume``: read or computed.

        Valid files are read; missing ones are computed and written; corrupt or stale ones are reported
        with a ``RuntimeWarning`` and rebuilt. Without a directory nothing is read or written and
        correspondences are left to be computed on demand.
        """
        key = self.keypoint_key(volume)
        slices, computed = self._load_slices(volume, key)
        result = VolumeKeypoints(key, slices, float(self.keypoint_settings.radius_forward),
                                 float(self.keypoint_settings.radius_reverse), computed=computed)
        if pairs and self.directory is not None:
            result.matches.update(self._load_matches(result, volume.slices))
        return result

    def status(self, volume: PreparedVolume) -> str:
        """``"missing"``, ``"valid"`` or ``"corrupt"`` for the keypoint file of ``volume`` (reads only)."""
        path = self.keypoint_path(self.keypoint_key(volume))
        if not path.exists():
            return "missing"
        try:
            self._parse_slices(_read_npz(path, path.stem), volume.image.shape)
        except _CorruptEntry:
            return "corrupt"
        return "valid"

    def _load_slices(self, volume: PreparedVolume, key: str) -> tuple[list[SliceKeypoints], bool]:
        if self.directory is not None:
            path = self.keypoint_path(key)
            if path.exists():
                try:
                    return self._parse_slices(_read_npz(path, key), volume.image.shape), False
                except _CorruptEntry as problem:
                    warnings.warn(f"{path}: corrupt keypoint cache entry ({problem}); rebuilding", RuntimeWarning,
                                  stacklevel=3)
        slices = detect_volume(volume.image, self.keypoint_settings.max_keypoints)
        if self.directory is not None:
            _write_npz(self.keypoint_path(key), self._pack_slices(key, slices, volume.image.shape))
        return slices, True

    @staticmethod
    def _pack_slices(key: str, slices: Sequence[SliceKeypoints], shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        return {
            "key": np.array(key),
            "shape": np.asarray(shape, np.int64),
            "counts": np.array([len(s) for s in slices], np.int64),
            "points": np.concatenate([s.points for s in slices]).reshape(-1, 2).astype(np.float32),
            "descriptors": np.concatenate([s.descriptors for s in slices]).reshape(-1, DESCRIPTOR_DIM).astype(np.float32),
            "responses": np.concatenate([s.responses for s in slices]).reshape(-1).astype(np.float32),
        }

    def _parse_slices(self, arrays: dict[str, np.ndarray], shape: tuple[int, ...]) -> list[SliceKeypoints]:
        try:
            stored_shape, counts = arrays["shape"], arrays["counts"]
            points, descriptors, responses = arrays["points"], arrays["descriptors"], arrays["responses"]
        except KeyError as missing:
            raise _CorruptEntry(f"array {missing} missing") from None
        _expect(stored_shape.tolist() == list(shape), f"volume shape {stored_shape.tolist()} differs from {list(shape)}")
        _expect(counts.dtype.kind == "i" and counts.shape == (shape[0],), f"counts of shape {counts.shape}, "
                f"expected ({shape[0]},)")
        total = int(counts.sum())
        _expect(bool(np.all((counts >= 0) & (counts <= self.keypoint_settings.max_keypoints))),
                f"keypoint counts outside 0..{self.keypoint_settings.max_keypoints}")
        _expect(points.shape == (total, 2) and points.dtype == np.float32, f"points {points.dtype} {points.shape}, "
                f"expected float32 ({total}, 2)")
        _expect(descriptors.shape == (total, DESCRIPTOR_DIM) and descriptors.dtype == np.float32,
                f"descriptors {descriptors.dtype} {descriptors.shape}, expected float32 ({total}, {DESCRIPTOR_DIM})")
        _expect(responses.shape == (total,) and responses.dtype == np.float32,
                f"responses {responses.dtype} {responses.shape}, expected float32 ({total},)")
        _expect(bool(np.isfinite(points).all() and np.isfinite(descriptors).all()), "non-finite values")
        _expect(bool(np.all((points >= -0.5) & (points <= np.array(shape[1:]) - 0.5))), "points outside the slice")
        bounds = np.concatenate([[0], np.cumsum(counts)])
        return [SliceKeypoints(points[a:b], descriptors[a:b], responses[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    def _load_matches(self, volume: VolumeKeypoints, slices: int) -> dict[tuple[int, int], np.ndarray]:
        path = self.match_path(volume.key)
        key = f"{volume.key}-{self.match_key(volume.key)}"
        if path.exists():
            try:
                return self._parse_matches(_read_npz(path, key), volume.slices)
            except _CorruptEntry as problem:
                warnings.warn(f"{path}: corrupt correspondence cache entry ({problem}); rebuilding", RuntimeWarning,
                              stacklevel=3)
        pairs = neighbour_pairs(slices, self.data_settings.neighbour_rule, self.data_settings.neighbour_fraction)
        matches = {(int(a), int(b)): volume.match12(a, b) for a, b in pairs}
        _write_npz(path, {
            "key": np.array(key),
            "pairs": pairs,
            "counts": np.array([len(matches[(int(a), int(b))]) for a, b in pairs], np.int64),
            "match12": np.concatenate([matches[(int(a), int(b))] for a, b in pairs] + [np.zeros(0, np.int64)]),
        })
        return matches

    @staticmethod
    def _parse_matches(arrays: dict[str, np.ndarray], slices: Sequence[SliceKeypoints]) -> dict[tuple[int, int], np.ndarray]:
        try:
            pairs, counts, match12 = arrays["pairs"], arrays["counts"], arrays["match12"]
        except KeyError as missing:
            raise _CorruptEntry(f"array {missing} missing") from None
        _expect(pairs.ndim == 2 and pairs.shape[1] == 2 and pairs.dtype.kind == "i", f"pairs {pairs.shape}")
        _expect(bool(np.all((pairs >= 0) & (pairs < len(slices)))), "slice index out of range")
        _expect(counts.shape == (len(pairs),) and match12.ndim == 1 and match12.dtype.kind == "i"
                and len(match12) == int(counts.sum()), "match arrays of inconsistent length")
        bounds = np.concatenate([[0], np.cumsum(counts)])
        matches = {}
        for (first, second), a, b in zip(pairs.tolist(), bounds[:-1], bounds[1:]):
            match = match12[a:b].astype(np.int64)
            n1, n2 = len(slices[first]), len(slices[second])
            _expect(len(match) == n1, f"pair ({first}, {second}): {len(match)} matches for {n1} keypoints")
            used = match[match >= 0]
            _expect(bool(np.all(match >= -1) and np.all(used < n2)) and len(np.unique(used)) == len(used),
                    f"pair ({first}, {second}): match indices not one-to-one within 0..{n2 - 1}")
            matches[(first, second)] = match
        return matches


def fill_cache(root: str | Path, settings: Settings, progress: bool = True) -> dict[str, int]:
    """Compute and store the keypoints and correspondences of every volume of the data set under ``root``.

    Reads one case at a time (preprocessed with ``settings.data``); shows a tqdm bar when ``progress``.
    Returns counts: ``volumes``, ``slices``, ``keypoints``, ``computed`` (volumes whose keypoint file was
    missing or rebuilt) and ``reused``. Entry point of ``kpssl keypoints DIR [--preset P]``.
    """
    from tqdm.auto import tqdm

    from ..data.layouts import find_cases
    from ..data.slices import prepare_case

    root = Path(root)
    layout = settings.data.layout if settings.data.layout in ("acdc", "decathlon") else None
    cases = find_cases(root, layout, require_labels=False)
    cache = KeypointCache(root, settings.keypoints, settings.data)
    counts = {"volumes": 0, "slices": 0, "keypoints": 0, "computed": 0, "reused": 0}
    for case in tqdm(cases, desc="keypoints", unit="volume", disable=not progress):
        volume = prepare_case(case, settings.data, labels=False)
        loaded = cache.load(volume)
        counts["computed" if loaded.computed else "reused"] += 1
        counts["volumes"] += 1
        counts["slices"] += volume.slices
        counts["keypoints"] += sum(len(s) for s in loaded.slices)
    return counts


def load_all(cache: KeypointCache, volumes: Iterable[PreparedVolume], progress: bool = False) -> list[VolumeKeypoints]:
    """:meth:`KeypointCache.load` over volumes, with an optional progress bar."""
    from tqdm.auto import tqdm

    volumes = list(volumes)
    return [cache.load(v) for v in tqdm(volumes, desc="keypoints", unit="volume", disable=not progress)]
