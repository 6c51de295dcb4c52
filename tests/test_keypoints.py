"""Keypoints: SIFT conventions, exact tracking through augmentation, correspondences, cache, datasets."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch.utils.data import DataLoader

from kpssl.data import LabelledSlices, center_pad_crop
from kpssl.data.layouts import Case
from kpssl.data.slices import PreparedVolume
from kpssl.keypoints import (
    KeypointCache, LabelledKeypointSlices, PairDataset, ViewTransform, apply_transform,
    augment_view, centre_transform, collate_keypoints, detect_keypoints, detect_volume, elastic_field, fill_cache,
    mutual_matches, neighbour_pairs, neighbour_slice, restrict_matches, sample_transform, warp_image, warp_points,
)
from kpssl.keypoints.augment import displacement_at
from kpssl.keypoints.cache import default_cache_dir
from kpssl.settings import AugmentSettings, preset

from conftest import write_tiny_acdc


# --- helpers ---------------------------------------------------------------------------------------
def blobs(shape: tuple[int, int], points: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    rows, cols = np.mgrid[:shape[0], :shape[1]]
    image = np.zeros(shape, np.float32)
    for r, c in points:
        image += np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * sigma ** 2)).astype(np.float32)
    return image


def spread_points(shape: tuple[int, int], step: float, rng: np.random.Generator, margin: float = 15) -> np.ndarray:
    rows, cols = np.meshgrid(np.arange(margin, shape[0] - margin, step), np.arange(margin, shape[1] - margin, step),
                             indexing="ij")
    return np.stack([rows.ravel(), cols.ravel()], 1) + rng.uniform(-step / 8, step / 8, (rows.size, 2))


def centroid(image: np.ndarray, point: np.ndarray, radius: int = 5) -> np.ndarray:
    r, c = int(round(point[0])), int(round(point[1]))
    rows, cols = np.mgrid[r - radius:r + radius + 1, c - radius:c + radius + 1]
    window = image[r - radius:r + radius + 1, c - radius:c + radius + 1]
    return np.array([(rows * window).sum(), (cols * window).sum()]) / window.sum()


def texture(shape: tuple[int, ...], seed: int, sigma: float = 2.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(rng.normal(size=shape), (0, sigma, sigma) if len(shape) == 3 else sigma)
    return ((image - image.mean()) / image.std()).astype(np.float32)


def volume(image: np.ndarray, label: np.ndarray | None = None, name: str = "v") -> PreparedVolume:
    case = Case(name, name, Path(f"/nowhere/{name}.nii.gz"), None if label is None else Path(f"/nowhere/{name}_gt.nii.gz"))
    return PreparedVolume(case, image, label, (10.0, 1.25, 1.25))


def small_volume(seed: int, slices: int = 4, size: int = 64) -> PreparedVolume:
    base = texture((size, size), seed)
    image = np.stack([np.roll(base, z, axis=1) + 0.2 * texture((size, size), seed * 100 + z) for z in range(slices)])
    label = (image > 0.5).astype(np.int64) + (image > 1.2)
    return volume(image.astype(np.float32), label, f"v{seed}")


def small_settings(patch: int = 48, k: int = 24):
    s = preset("tiny")
    s.data.patch = patch
    s.keypoints.max_keypoints = k
    return s


# --- detection -------------------------------------------------------------------------------------
def test_sift_points_have_integer_pixel_centres():
    truth = np.array([[40.0, 60.0], [80.3, 30.6], [100.5, 110.5]])
    image = blobs((140, 150), truth, sigma=3.0)
    found = detect_keypoints(image, 50)
    for p in truth:
        nearest = found.points[np.argmin(np.abs(found.points - p).sum(1))]
        np.testing.assert_allclose(nearest, p, atol=0.05)


def test_detection_keeps_the_strongest_unique_locations():
    image = texture((120, 120), 1)
    everything = detect_keypoints(image, 10_000)
    strongest = detect_keypoints(image, 15)
    assert len(strongest) == 15 and len(everything) > 15
    assert np.all(np.diff(everything.responses) <= 0)
    np.testing.assert_array_equal(strongest.points, everything.points[:15])
    assert len(np.unique(everything.points, axis=0)) == len(everything)
    assert strongest.points.dtype == np.float32 and strongest.descriptors.shape == (15, 128)
    assert len(detect_keypoints(image, 10_000, unique_locations=False)) >= len(everything)


def test_constant_and_empty_slices_give_no_keypoints():
    for image in (np.zeros((50, 60), np.float32), np.full((50, 60), 3.0, np.float32)):
        found = detect_keypoints(image, 20)
        assert len(found) == 0 and found.points.shape == (0, 2) and found.descriptors.shape == (0, 128)
    assert [len(s) for s in detect_volume(np.zeros((3, 30, 30), np.float32), 5)] == [0, 0, 0]
    with pytest.raises(ValueError, match="2D slice"):
        detect_keypoints(np.zeros((2, 3, 4)), 5)


# --- augmentation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("augment, tolerance", [
    (AugmentSettings(p_deform=0.0), 0.05),  # crop + mirrors only: slicing, exact
    (AugmentSettings(p_deform=1.0, elastic_alpha=(0.0, 0.0)), 0.5),  # + rotation and scale
    (AugmentSettings(p_deform=1.0), 1.0),  # + elastic
])
def test_tracked_keypoints_sit_on_the_warped_dots(augment, tolerance):
    rng = np.random.default_rng(0)
    shape = (150, 170)
    points = spread_points(shape, 20.0, rng)
    image = blobs(shape, points)
    checked = 0
    for _ in range(6):
        view = augment_view(image, None, points, rng, 120, augment)
        warped = view.image.numpy()
        for p in view.points[view.valid]:
            if 6 < p[0] < 113 and 6 < p[1] < 113:
                assert np.abs(centroid(warped, p) - p).max() < tolerance
                checked += 1
    assert checked > 50


def test_elastic_tracking_solves_the_sampling_map_exactly():
    """Warp coordinate ramps: at a tracked keypoint the view reads back the source position."""
    rng = np.random.default_rng(1)
    shape = (130, 140)
    rows, cols = np.mgrid[:shape[0], :shape[1]].astype(np.float32)
    points = np.stack([rng.uniform(5, shape[0] - 6, 300), rng.uniform(5, shape[1] - 6, 300)], 1)  # ramps fade at edges
    for _ in range(4):
        transform = sample_transform(rng, shape, 100, AugmentSettings(p_deform=1.0, elastic_alpha=(350, 350)))
        moved, valid = warp_points(points, transform)
        read = [warp_image(ramp, transform).numpy() for ramp in (rows, cols)]
        for p, q in zip(moved[valid], points[valid]):
            r0, c0 = min(int(p[0]), 98), min(int(p[1]), 98)
            fr, fc = p[0] - r0, p[1] - c0
            value = [(1 - fr) * ((1 - fc) * g[r0, c0] + fc * g[r0, c0 + 1]) + fr * ((1 - fc) * g[r0 + 1, c0]
                     + fc * g[r0 + 1, c0 + 1]) for g in read]
            assert np.abs(np.array(value) - q).max() < 0.05  # reading the view bilinearly: O(0.01) px


def test_keypoints_leaving_the_patch_become_invalid():
    transform = ViewTransform(np.eye(2), np.array([30.0, 20.0]), 40, (100, 100))
    points = np.array([[30.0, 20.0], [69.0, 59.0], [29.9, 40.0], [50.0, 59.5], [50.0, 45.0], [99.0, 0.0]])
    moved, valid = warp_points(points, transform)
    np.testing.assert_array_equal(valid, [True, True, False, False, True, False])
    np.testing.assert_allclose(moved[valid], [[0, 0], [39, 39], [20, 25]])
    assert np.all(moved[~valid] == 0)
    rng = np.random.default_rng(2)
    for _ in range(20):  # random views: valid keypoints always inside the pixel-centre hull
        view = augment_view(np.zeros((100, 100), np.float32), None, rng.uniform(0, 99, (50, 2)), rng, 40,
                            AugmentSettings())
        assert np.all((view.points >= 0) & (view.points <= 39)) and 0 < view.valid.sum() < 50


def test_mirror_crop_view_equals_slicing_and_centre_crop_equals_center_pad_crop():
    image = np.arange(30 * 25, dtype=np.float32).reshape(30, 25)
    flipped = ViewTransform(np.diag([-1.0, 1.0]), np.array([5.0 + 19, 3.0]), 20, image.shape)
    np.testing.assert_array_equal(warp_image(image, flipped).numpy(), image[5:25, 3:23][::-1])
    for size in (20, 24, 25, 31, 40):
        expected, offset = center_pad_crop(image, size, fill=-7.0)
        view = apply_transform(image, image.astype(np.int64), np.array([[10.0, 12.0]]),
                               centre_transform(image.shape, size), -7.0)
        np.testing.assert_array_equal(view.image.numpy(), expected)
        np.testing.assert_allclose(view.points[0], [10 + offset[0], 12 + offset[1]])


def test_label_follows_the_image():
    rng = np.random.default_rng(3)
    label = np.zeros((90, 90), np.int64)
    label[30:60, 20:50] = 2
    image = label.astype(np.float32) * 5
    centre = np.array([[44.5, 34.5]])
    for _ in range(10):
        view = augment_view(image, label, centre, rng, 64, AugmentSettings(p_deform=1.0))
        agree = (view.label.numpy() == 2) == (view.image.numpy() > 5)
        assert agree.mean() > 0.97
        if view.valid[0]:
            r, c = np.round(view.points[0]).astype(int)
            assert view.label[r, c] == 2


def test_elastic_field_matches_the_simard_magnitude():
    rng = np.random.default_rng(4)
    alpha, sigma = 300.0, 15.0
    stds = [elastic_field(rng, 352, alpha, sigma).std() for _ in range(40)]
    simard = [alpha * ndimage.gaussian_filter(rng.uniform(-1, 1, (352, 352)), sigma).std() for _ in range(8)]
    assert np.mean(stds) == pytest.approx(np.mean(simard), rel=0.2)
    field = elastic_field(rng, 100, alpha, sigma)
    nodes = field.shape[-1]
    at_nodes = displacement_at(field, 100, np.stack(np.meshgrid(*2 * [np.arange(nodes) * 99 / (nodes - 1)],
                                                                indexing="ij"), -1).reshape(-1, 2))
    np.testing.assert_allclose(at_nodes, field.reshape(2, -1).T, atol=1e-9)


# --- correspondences -------------------------------------------------------------------------------
def slow_matches(p1, d1, p2, d2, forward, reverse):
    n1, n2 = len(p1), len(p2)
    manhattan = [[abs(p1[a][0] - p2[b][0]) + abs(p1[a][1] - p2[b][1]) for b in range(n2)] for a in range(n1)]
    descriptor = [[float(np.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(d1[a], d2[b])))) for b in range(n2)]
                  for a in range(n1)]
    largest = max((v for row in descriptor for v in row), default=0.0)
    weight = [[descriptor[a][b] if manhattan[a][b] < reverse else largest for b in range(n2)] for a in range(n1)]
    match12 = [-1] * n1
    for a in range(n1):
        if not any(manhattan[a][b] < forward for b in range(n2)):
            continue
        b = min(range(n2), key=lambda j: (weight[a][j], j))
        if not any(manhattan[i][b] < reverse for i in range(n1)):
            continue
        if min(range(n1), key=lambda i: (weight[i][b], i)) == a:
            match12[a] = b
    return np.array(match12, dtype=np.int64)


@pytest.mark.parametrize("seed", range(6))
def test_correspondences_match_a_slow_reference(seed):
    rng = np.random.default_rng(seed)
    n1, n2 = rng.integers(0, 40, 2) if seed else (0, 5)
    p1, p2 = rng.uniform(0, 80, (n1, 2)), rng.uniform(0, 80, (n2, 2))
    d1, d2 = rng.uniform(0, 100, (n1, 128)), rng.uniform(0, 100, (n2, 128))
    for forward, reverse in ((20, 30), (20, 20), (30, 12)):
        fast = mutual_matches(p1, d1, p2, d2, forward, reverse)
        np.testing.assert_array_equal(fast.match12, slow_matches(p1, d1, p2, d2, forward, reverse))
        for a, b in fast.pairs:  # mutual nearest neighbours, one to one
            assert fast.match21[b] == a
        assert len(np.unique(fast.match12[fast.match12 >= 0])) == len(fast.pairs)
        assert len(fast.pairs) + len(fast.unmatched1) == n1 and len(fast.pairs) + len(fast.unmatched2) == n2


def test_correspondences_of_a_slice_with_itself_match_everything():
    found = detect_keypoints(texture((100, 100), 5), 40)
    same = mutual_matches(found.points, found.descriptors, found.points, found.descriptors, 20, 30)
    np.testing.assert_array_equal(same.match12, np.arange(len(found)))


def test_invalid_keypoints_unmatch_their_partner():
    match12 = np.array([2, -1, 0, 1])
    m12, m21 = restrict_matches(match12, np.array([True, True, True, False]), np.array([True, True, False]))
    np.testing.assert_array_equal(m12, [-1, -1, 0, -1])
    np.testing.assert_array_equal(m21, [2, -1, -1])


def test_neighbour_rules():
    rng = np.random.default_rng(0)
    assert neighbour_slice(0, 1, "adjacent", 0.05, rng) == 0
    assert neighbour_slice(0, 1, "fraction", 0.05, rng) == 0
    assert neighbour_slice(0, 5, "adjacent", 0.05, rng) == 1 and neighbour_slice(4, 5, "adjacent", 0.05, rng) == 3
    assert {neighbour_slice(2, 5, "adjacent", 0.05, rng) for _ in range(50)} == {1, 3}
    for slices, fraction in ((200, 0.05), (30, 0.05), (7, 0.5)):
        allowed = {tuple(p) for p in neighbour_pairs(slices, "fraction", fraction)}
        for index in (0, 1, slices // 2, slices - 1):
            for _ in range(100):
                partner = neighbour_slice(index, slices, "fraction", fraction, rng)
                assert partner != index and (index, partner) in allowed
    assert {neighbour_slice(0, 200, "fraction", 0.05, rng) for _ in range(400)} == set(range(1, 10))  # int(0.05 u 200) < 10
    with pytest.raises(ValueError, match="rule"):
        neighbour_slice(0, 5, "random", 0.05, rng)
    # near a volume end, offsets leading outside are redrawn, not clipped onto the end slice: from
    # slice 2 of 200, only offset -2 reaches slice 0 (probability 0.05 / 0.55, about 0.09; clipping
    # would send offsets -2 .. -9 there, 0.4 / 0.9, about 0.44)
    draws = [neighbour_slice(2, 200, "fraction", 0.05, rng) for _ in range(2000)]
    assert 0.05 < draws.count(0) / len(draws) < 0.14


# --- cache -----------------------------------------------------------------------------------------
def test_cache_round_trip_and_invalidation(tmp_path):
    settings = small_settings()
    vol = small_volume(1)
    cache = KeypointCache(tmp_path, settings.keypoints, settings.data)
    assert cache.directory == tmp_path / ".kpssl_cache" and not any(tmp_path.iterdir())  # constructor: no disk
    first = cache.load(vol)
    assert first.computed and len(list((cache.directory / "keypoints").glob("*.npz"))) == 1
    again = cache.load(vol)
    assert not again.computed
    for a, b in zip(first.slices, again.slices):
        np.testing.assert_array_equal(a.points, b.points)
        np.testing.assert_array_equal(a.descriptors, b.descriptors)
    assert again.matches.keys() == {tuple(p) for p in neighbour_pairs(4, "adjacent", 0.05)}
    for pair, match in first.matches.items():
        np.testing.assert_array_equal(match, again.matches[pair])
    # other settings -> other files, never the stale ones
    fewer = small_settings(k=5)
    other = KeypointCache(tmp_path, fewer.keypoints, fewer.data).load(vol)
    assert other.computed and max(len(s) for s in other.slices) == 5
    wider = small_settings()
    wider.keypoints.radius_reverse = 40.0
    assert KeypointCache(tmp_path, wider.keypoints, wider.data).match_path(first.key) != cache.match_path(first.key)
    changed = volume(vol.image * 2 + 1, vol.label, "v1")
    assert cache.keypoint_key(changed) != first.key
    assert len(list((cache.directory / "keypoints").glob("*.npz"))) == 2
    assert not list(tmp_path.rglob("*.tmp"))


def test_corrupt_and_stale_cache_entries_are_rebuilt(tmp_path):
    settings = small_settings()
    vol, other = small_volume(1), small_volume(2)
    cache = KeypointCache(tmp_path, settings.keypoints, settings.data)
    reference = cache.load(vol)
    path = cache.keypoint_path(reference.key)
    for damage in (lambda: path.write_bytes(path.read_bytes()[:200]),  # truncated
                   lambda: path.write_bytes(b"not a zip"),
                   lambda: path.write_bytes(cache.keypoint_path(cache.load(other).key).read_bytes())):  # wrong key
        damage()
        assert cache.status(vol) == "corrupt"
        with pytest.warns(RuntimeWarning, match="corrupt keypoint cache entry"):
            rebuilt = cache.load(vol)
        assert rebuilt.computed and cache.status(vol) == "valid"
        for a, b in zip(reference.slices, rebuilt.slices):
            np.testing.assert_array_equal(a.points, b.points)
    arrays = dict(np.load(path))
    arrays["points"] = arrays["points"][:-1]
    np.savez(path, **arrays)
    with pytest.warns(RuntimeWarning, match="points"):
        cache.load(vol)
    match_path = cache.match_path(reference.key)
    match_arrays = dict(np.load(match_path))
    match_arrays["match12"] = np.zeros_like(match_arrays["match12"])  # not one-to-one
    np.savez(match_path, **match_arrays)
    with pytest.warns(RuntimeWarning, match="corrupt correspondence cache entry"):
        loaded = cache.load(vol)
    for pair, match in reference.matches.items():
        np.testing.assert_array_equal(loaded.matches[pair], match)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.load(vol)  # now valid again, silently


def test_fill_cache_on_a_data_folder(tmp_path):
    root = write_tiny_acdc(tmp_path / "acdc", patients=1)
    settings = small_settings()
    counts = fill_cache(root, settings, progress=False)
    assert counts["volumes"] == 2 and counts["computed"] == 2 and counts["slices"] == 12
    assert len(list((default_cache_dir(root) / "keypoints").glob("*.npz"))) == 2
    assert fill_cache(root, settings, progress=False)["reused"] == 2


# --- datasets --------------------------------------------------------------------------------------
def test_pair_items_follow_the_contract(tmp_path):
    settings = small_settings(patch=48, k=24)
    volumes = [small_volume(1), small_volume(2, slices=1, size=40), volume(np.zeros((3, 50, 50), np.float32))]
    data = PairDataset(volumes, settings, tmp_path, seed=3)
    assert not any(tmp_path.iterdir())  # nothing loaded before the first item
    batch = collate_keypoints([data[i] for i in range(len(data))])
    n = len(data)
    assert batch["view1"].shape == batch["view2"].shape == (n, 1, 48, 48)
    assert batch["keypoints1"].shape == (n, 24, 2) and batch["valid1"].dtype == torch.bool
    assert batch["match12"].dtype == torch.int64 and batch["position"].dtype == torch.float32
    assert torch.all(batch["keypoints1"][~batch["valid1"]] == 0)
    # matches are one-to-one, between valid keypoints, and match21 mirrors match12
    for b in range(n):
        m12, m21 = batch["match12"][b], batch["match21"][b]
        for a in torch.nonzero(m12 >= 0).flatten():
            assert batch["valid1"][b, a] and batch["valid2"][b, m12[a]] and m21[m12[a]] == a
        assert (m21 >= 0).sum() == (m12 >= 0).sum()
    # the empty volume flows through, with no valid keypoints; the single slice pairs with itself
    empty = batch["volume"] == 2
    assert not batch["valid1"][empty].any() and not batch["valid2"][empty].any()
    single = batch["volume"] == 1
    assert torch.equal(batch["neighbour"][single], batch["slice"][single])
    assert (batch["match12"][single] >= 0).any()
    np.testing.assert_allclose(batch["position"][:4], [0.25, 0.5, 0.75, 1.0])
    # reproducible per (seed, epoch, item)
    assert torch.equal(data[2]["view1"], data[2]["view1"])
    data.set_epoch(1)
    assert not torch.equal(data[2]["view1"], PairDataset(volumes, settings, tmp_path, seed=3)[2]["view1"])


def test_same_slice_views_augment_one_slice_twice(tmp_path):
    """The baselines' views (SimCLR, GCL, PCL): two independent augmentations of slice i itself."""
    settings = small_settings(patch=48, k=24)
    volumes = [small_volume(1), small_volume(2, slices=3)]
    same = PairDataset(volumes, settings, tmp_path, seed=3, views="same")
    batch = collate_keypoints([same[i] for i in range(len(same))])
    assert torch.equal(batch["neighbour"], batch["slice"])
    assert not torch.equal(batch["view1"], batch["view2"])  # each view has its own crop and augmentation
    # every keypoint valid in both views is its own partner (the same SIFT keypoint, moved twice)
    for b in range(len(same)):
        m12 = batch["match12"][b]
        both = batch["valid1"][b] & batch["valid2"][b]
        assert torch.equal(m12[both], torch.nonzero(both).flatten())
    neighbour = PairDataset(volumes, settings, tmp_path, seed=3)
    assert neighbour.views == "neighbour"
    items = [neighbour[i] for i in range(len(neighbour))]
    assert all(abs(int(item["neighbour"]) - int(item["slice"])) == 1 for item in items)
    with pytest.raises(ValueError, match="views"):
        PairDataset(volumes, settings, tmp_path, views="other")


def test_loader_workers_do_not_change_batches(tmp_path):
    settings = small_settings(patch=48, k=24)
    volumes = [small_volume(1), small_volume(2, slices=3)]
    batches = {}
    for workers in (0, 2):
        data = PairDataset(volumes, settings, tmp_path, seed=7)
        data.set_epoch(2)
        loader = DataLoader(data, batch_size=3, num_workers=workers, collate_fn=collate_keypoints)
        batches[workers] = list(loader)
    assert len(batches[0]) == len(batches[2]) == 3
    for a, b in zip(batches[0], batches[2]):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_labelled_keypoint_slices(tmp_path):
    settings = small_settings(patch=48, k=24)
    volumes = [small_volume(1), small_volume(2)]
    plain = LabelledSlices(volumes, settings.data)
    evaluation = LabelledKeypointSlices(volumes, settings, tmp_path, augment=False)
    training = LabelledKeypointSlices(volumes, settings, tmp_path, augment=True, seed=1)
    for i in (0, 5):
        item, reference = evaluation[i], plain[i]
        assert torch.equal(item["image"], reference["image"]) and torch.equal(item["label"], reference["label"])
        v, z = int(item["volume"]), int(item["slice"])
        original = evaluation.volume_keypoints(v).slices[z].points
        _, offset = center_pad_crop(volumes[v].image[z], 48)
        shifted = original + np.array(offset, np.float32)
        inside = np.all((shifted >= 0) & (shifted <= 47), axis=1)
        np.testing.assert_array_equal(item["valid"][:len(original)].numpy(), inside)
        np.testing.assert_allclose(item["keypoints"][:len(original)][inside].numpy(), shifted[inside])
    batch = collate_keypoints([training[i] for i in range(6)])
    assert batch["image"].shape == (6, 1, 48, 48) and batch["label"].dtype == torch.int64
    assert set(batch["label"].unique().tolist()) <= {0, 1, 2}
    with pytest.raises(ValueError, match="needs labels"):
        LabelledKeypointSlices([volume(np.zeros((2, 30, 30), np.float32))], settings)


def test_collate_pads_shorter_items_and_rejects_bad_input():
    items = [{"keypoints": torch.ones(3, 2), "valid": torch.ones(3, dtype=torch.bool)},
             {"keypoints": torch.ones(5, 2), "valid": torch.ones(5, dtype=torch.bool)}]
    batch = collate_keypoints(items)
    assert batch["keypoints"].shape == (2, 5, 2) and batch["valid"][0].tolist() == [True] * 3 + [False] * 2
    with pytest.raises(ValueError, match="empty"):
        collate_keypoints([])
    with pytest.raises(ValueError, match="made for"):
        PairDataset([small_volume(1)], small_settings(k=24), KeypointCache(None, small_settings(k=50).keypoints,
                                                                          small_settings().data))


def test_a_cache_without_settings_takes_the_datasets(tmp_path):
    settings = small_settings(k=24)
    unbound = KeypointCache(tmp_path)
    with pytest.raises(ValueError, match="no settings"):
        unbound.load(small_volume(1))
    data = PairDataset([small_volume(1)], settings, unbound)
    assert data.cache.keypoint_settings == settings.keypoints and data.cache.directory == default_cache_dir(tmp_path)
    data[0]
    assert len(list((tmp_path / ".kpssl_cache" / "keypoints").glob("*.npz"))) == 1


def test_read_only_cache_folder_warns_and_keeps_going(tmp_path):
    settings = small_settings()
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    cache = KeypointCache(keypoints=settings.keypoints, data=settings.data, directory=blocked / "cache")
    with pytest.warns(RuntimeWarning, match="cannot write"):
        loaded = cache.load(small_volume(1))
    assert loaded.computed and len(loaded.slices) == 4
