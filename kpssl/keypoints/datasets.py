"""Datasets with keypoints: pretraining pairs of neighbouring slices, and labelled slices.

Items and batches follow CONTRIBUTING.md. Every item holds exactly ``K = KeypointSettings.max_keypoints``
keypoint slots (strongest SIFT keypoints first, then padding): ``keypoints (K, 2)`` float32 ``(row, col)``
in the patch, ``valid (K,)`` bool; padded and invalidated slots hold ``(0, 0)``. Nothing is dropped: a
slice without keypoints gives an all-invalid item. :func:`collate_keypoints` stacks items (padding any
shorter ones), so batches have a fixed ``K``.

Randomness. Item ``i`` of epoch ``e`` draws everything (neighbour, crops, mirrors, deformations) from
``np.random.default_rng([seed, e, i])``: a batch does not depend on the number of DataLoader workers or
on which worker made it. Call :meth:`PairDataset.set_epoch` before each epoch (with the default
``persistent_workers=False`` the workers get a fresh copy of the dataset every epoch).

Keypoints come from a :class:`~kpssl.keypoints.cache.KeypointCache`, loaded per volume the first time an
item needs it (in whichever process asks) or all at once with :meth:`prepare`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.slices import PreparedVolume, slice_index, slice_partition, slice_position
from ..settings import AugmentSettings, Settings
from .augment import apply_transform, augment_view, centre_transform
from .cache import KeypointCache, VolumeKeypoints
from .correspond import neighbour_slice, restrict_matches

__all__ = ["pad_keypoints", "pad_matches", "pair_views", "collate_keypoints", "collate_pairs", "check_pair_batch",
           "collate_labelled",
           "PairDataset", "PAIR_VIEWS", "LabelledKeypointSlices"]

# Keys holding one entry per keypoint slot, and their padding values.
_PER_KEYPOINT = {"keypoints": 0.0, "keypoints1": 0.0, "keypoints2": 0.0, "valid": False, "valid1": False,
                 "valid2": False, "match12": -1, "match21": -1}


def pad_keypoints(points: np.ndarray, valid: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``points (n, 2)``, ``valid (n,)`` -> ``(K, 2)`` float32 and ``(K,)`` bool; padding is (0, 0), invalid."""
    n = len(points)
    if n > k:
        raise ValueError(f"{n} keypoints do not fit in K = {k} slots")
    padded = torch.zeros(k, 2, dtype=torch.float32)
    mask = torch.zeros(k, dtype=torch.bool)
    padded[:n] = torch.from_numpy(np.asarray(points, np.float32).reshape(n, 2))
    mask[:n] = torch.from_numpy(np.asarray(valid, bool))
    return padded, mask


def pad_matches(match: np.ndarray, k: int) -> torch.Tensor:
    """``match (n,)`` -> ``(K,)`` int64, padding ``-1``."""
    if len(match) > k:
        raise ValueError(f"{len(match)} matches do not fit in K = {k} slots")
    padded = torch.full((k,), -1, dtype=torch.int64)
    padded[:len(match)] = torch.from_numpy(np.asarray(match, np.int64))
    return padded


def pair_views(
    image1: np.ndarray, points1: np.ndarray, image2: np.ndarray, points2: np.ndarray, match12: np.ndarray,
    rng: np.random.Generator, size: int, augment: AugmentSettings, k: int, fill1: float = 0.0, fill2: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Two independently augmented views of a slice pair with their keypoints and matches.

    ``image (H, W)`` slices, ``points (n, 2)`` their original keypoints, ``match12 (n1,)`` the
    correspondences of the original keypoints. Returns ``view1, view2 (1, P, P)``, ``keypoints1/2 (K, 2)``,
    ``valid1/2 (K,)``, ``match12, match21 (K,)`` (a pair with an invalid side becomes unmatched on both).
    """
    first = augment_view(image1, None, points1, rng, size, augment, fill1)
    second = augment_view(image2, None, points2, rng, size, augment, fill2)
    match12, match21 = restrict_matches(match12, first.valid, second.valid)
    keypoints1, valid1 = pad_keypoints(first.points, first.valid, k)
    keypoints2, valid2 = pad_keypoints(second.points, second.valid, k)
    return {
        "view1": first.image[None], "view2": second.image[None],  # (1, P, P)
        "keypoints1": keypoints1, "keypoints2": keypoints2, "valid1": valid1, "valid2": valid2,
        "match12": pad_matches(match12, k), "match21": pad_matches(match21, k),
    }


def collate_keypoints(items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack dataset items into a batch; per-keypoint entries are padded to the longest item's K first."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    keys = set(items[0])
    for item in items[1:]:
        if set(item) != keys:
            raise ValueError(f"items disagree on their keys: {sorted(keys)} vs {sorted(item)}")
    batch = {}
    for key in items[0]:
        values = [torch.as_tensor(item[key]) for item in items]
        if key in _PER_KEYPOINT:
            k = max(v.shape[0] for v in values)
            values = [v if v.shape[0] == k else torch.cat(
                [v, torch.full((k - v.shape[0], *v.shape[1:]), _PER_KEYPOINT[key], dtype=v.dtype)]) for v in values]
        batch[key] = torch.stack(values)
    return batch


def check_pair_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Check a pair batch's correspondences once, on the CPU where the batch is made; return the batch.

    ``match12 (B, K1)`` must hold ``-1`` or an index into view 2 and ``match21 (B, K2)`` likewise, and
    every match between valid keypoints must be mutual (the conditions of
    :func:`kpssl.losses.matching.matched_pairs`). The training step can then compute Eq. 2 without
    reading these values back from the GPU (no synchronisation, no ``torch.compile`` graph break).
    Batches without matches (the global-only methods) pass unchanged.
    """
    if "match12" not in batch and "match21" not in batch:
        return batch
    from ..losses.matching import matched_pairs

    try:
        matched_pairs(batch["match12"].cpu(), batch["match21"].cpu(), batch["valid1"].cpu(), batch["valid2"].cpu(),
                      check_consistency=True)
    except (KeyError, ValueError) as error:
        raise ValueError(f"pair batch: {error}") from None
    return batch


def collate_pairs(items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """:func:`collate_keypoints` for :class:`PairDataset` items, then :func:`check_pair_batch`."""
    return check_pair_batch(collate_keypoints(items))


collate_labelled = collate_keypoints  # for LabelledKeypointSlices items


def _resolve_cache(cache: KeypointCache | str | Path | None, settings: Settings) -> KeypointCache:
    if isinstance(cache, KeypointCache):
        return cache.bind(settings.keypoints, settings.data)
    if cache is None or isinstance(cache, (str, Path)):
        return KeypointCache(cache, settings.keypoints, settings.data)
    raise TypeError(f"cache must be a KeypointCache, a data folder or None, got {type(cache).__name__}")


class _KeypointSlices(Dataset):
    """Shared bookkeeping: volumes, slice index, lazily loaded keypoints, per-item random generators."""

    def __init__(self, volumes: Sequence[PreparedVolume], settings: Settings,
                 cache: KeypointCache | str | Path | None, seed: int):
        if not volumes:
            raise ValueError("no volumes given")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if settings.data.patch < 2:
            raise ValueError(f"patch must be >= 2, got {settings.data.patch}")
        self.volumes = list(volumes)
        self.settings = settings
        self.cache = _resolve_cache(cache, settings)
        self.seed = int(seed)
        self.epoch = 0
        self.index = slice_index(self.volumes)  # (N, 2) (volume, slice)
        self._keypoints: dict[int, VolumeKeypoints] = {}
        self._fills: dict[int, float] = {}

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random draws items make (see the module docstring)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def prepare(self, progress: bool = False) -> "_KeypointSlices":
        """Load (or compute and cache) the keypoints of every volume now, in this process."""
        from tqdm.auto import tqdm

        for v in tqdm(range(len(self.volumes)), desc="keypoints", unit="volume", disable=not progress):
            self.volume_keypoints(v)
        return self

    def volume_keypoints(self, volume: int) -> VolumeKeypoints:
        if volume not in self._keypoints:
            self._keypoints[volume] = self.cache.load(self.volumes[volume])
        return self._keypoints[volume]

    def fill(self, volume: int) -> float:
        """The value outside a slice: the volume's minimum (its background), as in ``LabelledSlices``."""
        if volume not in self._fills:
            self._fills[volume] = float(self.volumes[volume].image.min())
        return self._fills[volume]

    def generator(self, item: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(item)])

    def _slice_info(self, v: int, z: int) -> dict[str, torch.Tensor]:
        count = self.volumes[v].slices
        return {
            "position": torch.tensor(slice_position(z, count), dtype=torch.float32),
            "partition": torch.tensor(slice_partition(z, count, self.settings.data.partitions), dtype=torch.int64),
            "volume": torch.tensor(v, dtype=torch.int64),
        }


PAIR_VIEWS = ("neighbour", "same")


class PairDataset(_KeypointSlices):
    """Pretraining pairs: two views of slice ``i``, each with its own crop and augmentation.

    ``views="neighbour"`` (KAF): view 2 is a neighbouring slice, so the keypoint correspondences
    between two slices teach the matching loss. ``views="same"`` (SimCLR, GCL, PCL, as in their papers):
    both views come from slice ``i`` itself, two independent augmentations (every keypoint then matches
    itself).

    Item ``i`` (slice ``i`` of :func:`kpssl.data.slice_index`): ``view1, view2 (1, P, P)``,
    ``keypoints1/2 (K, 2)``, ``valid1/2 (K,)``, ``match12, match21 (K,)`` (from the ORIGINAL keypoints,
    the paper's criterion; restricted to pairs valid in both views), ``position`` and ``partition`` of slice
    ``i``, ``volume``, and (beyond CONTRIBUTING's list) ``slice`` and ``neighbour`` indices.
    Neighbours follow ``DataSettings.neighbour_rule`` (:func:`~kpssl.keypoints.correspond.neighbour_slice`).

    Args:
        volumes: preprocessed volumes (labels unused).
        settings: uses ``data`` (patch, neighbour rule, partitions), ``keypoints`` (K, radii), ``augment``.
        cache: a :class:`KeypointCache` (its settings, if any, must agree), the data set's folder (the
            cache lives in ``folder/.kpssl_cache``), or None (computed in memory, nothing written).
        seed: base seed of the per-item generators ``default_rng([seed, epoch, item])``.
        views: ``"neighbour"`` or ``"same"``, see above.

    Example::

        data = PairDataset(volumes, settings, KeypointCache(root), seed=0).prepare()
        loader = DataLoader(data, batch_size=32, shuffle=True, num_workers=2, collate_fn=collate_keypoints)
        for epoch in range(epochs):
            data.set_epoch(epoch)
            for batch in loader: ...
    """

    def __init__(self, volumes: Sequence[PreparedVolume], settings: Settings,
                 cache: KeypointCache | str | Path | None = None, seed: int = 0, views: str = "neighbour"):
        if views not in PAIR_VIEWS:
            raise ValueError(f"unknown views {views!r}; expected one of {', '.join(PAIR_VIEWS)}")
        super().__init__(volumes, settings, cache, seed)
        self.views = views

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        if not 0 <= item < len(self):
            raise IndexError(f"item {item} outside 0..{len(self) - 1}")
        v, z = (int(i) for i in self.index[item])
        volume, data = self.volumes[v], self.settings.data
        rng = self.generator(item)
        if self.views == "same":
            partner = z
        else:
            partner = neighbour_slice(z, volume.slices, data.neighbour_rule, data.neighbour_fraction, rng)
        keypoints = self.volume_keypoints(v)
        fill = self.fill(v)
        out = pair_views(volume.image[z], keypoints.slices[z].points, volume.image[partner],
                         keypoints.slices[partner].points, keypoints.match12(z, partner), rng, data.patch,
                         self.settings.augment, self.settings.keypoints.max_keypoints, fill, fill)
        out.update(self._slice_info(v, z))
        out["slice"] = torch.tensor(z, dtype=torch.int64)
        out["neighbour"] = torch.tensor(partner, dtype=torch.int64)
        return out


class LabelledKeypointSlices(_KeypointSlices):
    """Labelled slices with keypoints, for fine-tuning (``augment=True``) and evaluation (``False``).

    Item: ``image (1, P, P)`` float32, ``label (P, P)`` int64, ``keypoints (K, 2)``, ``valid (K,)``,
    ``position``, ``partition``, ``volume``, ``slice``. Without augmentation the patch is the centre
    pad/crop of :func:`kpssl.data.center_pad_crop` (identical pixels to ``LabelledSlices``); with it, the
    pretraining augmentation moves image, label (nearest) and keypoints together.
    """

    def __init__(self, volumes: Sequence[PreparedVolume], settings: Settings,
                 cache: KeypointCache | str | Path | None = None, augment: bool = False, seed: int = 0):
        super().__init__(volumes, settings, cache, seed)
        missing = [v.case_id for v in self.volumes if v.label is None]
        if missing:
            raise ValueError(f"LabelledKeypointSlices needs labels; none for {', '.join(missing)}")
        self.augment = bool(augment)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        if not 0 <= item < len(self):
            raise IndexError(f"item {item} outside 0..{len(self) - 1}")
        v, z = (int(i) for i in self.index[item])
        volume, size = self.volumes[v], self.settings.data.patch
        points = self.volume_keypoints(v).slices[z].points
        if self.augment:
            view = augment_view(volume.image[z], volume.label[z], points, self.generator(item), size,
                                self.settings.augment, self.fill(v))
        else:
            view = apply_transform(volume.image[z], volume.label[z], points,
                                   centre_transform(volume.image.shape[1:], size), self.fill(v))
        keypoints, valid = pad_keypoints(view.points, view.valid, self.settings.keypoints.max_keypoints)
        out = {"image": view.image[None], "label": view.label, "keypoints": keypoints, "valid": valid}
        out.update(self._slice_info(v, z))
        out["slice"] = torch.tensor(z, dtype=torch.int64)
        return out
