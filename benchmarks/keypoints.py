"""Cost of one pretraining pair at 352 x 352 with about 200 keypoints, on one CPU core.

Measures (paper_acdc preset: 1.25 mm, 352 x 352 patch, K = 200):

* ``cached``: :class:`kpssl.keypoints.PairDataset` items with keypoints and correspondences from the cache
  (loaded once): neighbour draw, two augmented views (crop, mirrors, with p = 0.67 elastic + rotation +
  scale in one grid_sample), exact keypoint tracking, match restriction, padding;
* ``uncached``: the same pair with SIFT on both slices and the correspondences recomputed every time (what
  the authors' code does per sample);
* ``loader``: pairs per second through a DataLoader with 2 workers, batch 16.

Data: the built-in synthetic cardiac MRI (``kpssl.data.synthetic``, 2 patients) when present, resampled with
the paper_acdc preset, then a textured 352 x 352 volume on which SIFT finds about 250 keypoints per slice (K = 200 kept)
(keys ``textured_*``); only the textured volume when the synthetic module is missing. Times are the
fastest of 5 blocks (wall clock; the build machine is shared), with this process's CPU time beside them.
Goal: cached <= 14 ms per pair (1/20 of the authors' reported 280 ms). The last line printed is JSON.

    python benchmarks/keypoints.py [--pairs 300]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import DataLoader

from kpssl.data.layouts import Case
from kpssl.data.slices import PreparedVolume, load_volumes
from kpssl.keypoints import KeypointCache, PairDataset, collate_keypoints, detect_keypoints, match_slices, pair_views
from kpssl.keypoints.correspond import neighbour_slice
from kpssl.settings import Settings, preset


def textured_volumes(folder: Path, slices: int = 10, size: int = 352) -> list[PreparedVolume]:
    """Smoothed noise with a little large-scale structure: SIFT finds about 250 keypoints per slice (K = 200 saturates)."""
    rng = np.random.default_rng(0)
    image = ndimage.gaussian_filter(rng.normal(size=(slices, size, size)), (0.7, 5.0, 5.0)).astype(np.float32)
    image = image / image.std() + np.linspace(-0.5, 0.5, size, dtype=np.float32)[None, None]
    image = (image - image.mean()) / image.std()
    case = Case("textured", "textured", folder / "textured.nii.gz", None)
    return [PreparedVolume(case, image, None, (10.0, 1.25, 1.25))]


def synthetic_volumes(settings: Settings, folder: Path) -> list[PreparedVolume] | None:
    """Two patients (ED + ES) of the built-in synthetic cardiac MRI, or None when the module is missing."""
    try:
        from kpssl.data.synthetic import write_synthetic_acdc
    except ImportError:
        return None
    write_synthetic_acdc(folder, 2, seed=0)
    return load_volumes(folder, settings.data, labels=False)


def best_of(blocks: int, pairs: int, make_pair) -> tuple[float, float]:
    """Wall ms per pair of the fastest of ``blocks`` blocks (robust to other load on a shared machine), and
    this process's CPU ms per pair over all blocks."""
    per_block = max(1, pairs // blocks)
    best, cpu_start, done = float("inf"), time.process_time(), 0
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(per_block):
            make_pair(done)
            done += 1
        best = min(best, (time.perf_counter() - start) / per_block * 1e3)
    return best, (time.process_time() - cpu_start) / done * 1e3


def time_items(dataset: PairDataset, pairs: int) -> tuple[float, float]:
    dataset[0]  # warm up
    return best_of(5, pairs, lambda i: dataset[i % len(dataset)])


def time_uncached(dataset: PairDataset, pairs: int) -> tuple[float, float]:
    """The same pairs with SIFT and correspondences recomputed for every one of them."""
    settings = dataset.settings
    k = settings.keypoints
    sift = cv2.SIFT_create()

    def make_pair(i: int) -> None:
        v, z = (int(x) for x in dataset.index[i % len(dataset)])
        volume = dataset.volumes[v]
        rng = dataset.generator(i % len(dataset))
        partner = neighbour_slice(z, volume.slices, settings.data.neighbour_rule, settings.data.neighbour_fraction, rng)
        first = detect_keypoints(volume.image[z], k.max_keypoints, detector=sift)
        second = detect_keypoints(volume.image[partner], k.max_keypoints, detector=sift)
        match12 = match_slices(first, second, k.radius_forward, k.radius_reverse).match12
        fill = dataset.fill(v)
        pair_views(volume.image[z], first.points, volume.image[partner], second.points, match12, rng,
                   settings.data.patch, settings.augment, k.max_keypoints, fill, fill)

    return best_of(5, pairs, make_pair)


def loader_rate(dataset: PairDataset, pairs: int, workers: int = 2, batch: int = 16) -> float:
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate_keypoints,
                        generator=torch.Generator().manual_seed(0))
    seen, epoch = 0, 0
    start = time.perf_counter()
    while seen < pairs:
        dataset.set_epoch(epoch)
        for batch_dict in loader:
            seen += len(batch_dict["view1"])
        epoch += 1
    return seen / (time.perf_counter() - start)


def measure(volumes: list[PreparedVolume], settings: Settings, root: Path, pairs: int, name: str,
            loader: bool) -> dict[str, float]:
    start = time.perf_counter()
    dataset = PairDataset(volumes, settings, KeypointCache(root), seed=0).prepare()
    fill_seconds = time.perf_counter() - start
    counts = [len(s) for v in range(len(volumes)) for s in dataset.volume_keypoints(v).slices]
    print(f"{name}: {len(volumes)} volumes, {len(dataset)} slices of {volumes[0].image.shape[1:]} "
          f"(patch {settings.data.patch}); keypoints per slice: mean {np.mean(counts):.0f} "
          f"(K = {settings.keypoints.max_keypoints}); cache filled in {fill_seconds:.1f} s")
    result = {"keypoints_per_slice": round(float(np.mean(counts)), 1)}
    result["cached_ms_per_pair"], result["cached_cpu_ms_per_pair"] = time_items(dataset, pairs)
    print(f"  cached pipeline:   {result['cached_ms_per_pair']:6.2f} ms per pair, best of 5 blocks "
          f"(CPU {result['cached_cpu_ms_per_pair']:.2f} ms; one core; goal <= 14)")
    result["uncached_ms_per_pair"], result["uncached_cpu_ms_per_pair"] = time_uncached(dataset, max(25, pairs // 5))
    print(f"  uncached pipeline: {result['uncached_ms_per_pair']:6.2f} ms per pair, best of 5 blocks "
          f"(CPU {result['uncached_cpu_ms_per_pair']:.2f} ms; SIFT + correspondences every time)")
    if loader:
        result["loader_pairs_per_s"] = loader_rate(dataset, 4 * pairs)
        print(f"  DataLoader, 2 workers: {result['loader_pairs_per_s']:6.1f} pairs per second")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=300, help="pairs timed per measurement")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    settings = preset("paper_acdc")
    with tempfile.TemporaryDirectory() as folder:
        synthetic = synthetic_volumes(settings, Path(folder) / "synthetic")
        textured = textured_volumes(Path(folder) / "textured")
        if synthetic is None:
            print("kpssl.data.synthetic missing: textured noise only")
            summary = measure(textured, settings, Path(folder) / "textured", args.pairs, "textured noise", True)
        else:
            summary = measure(synthetic, settings, Path(folder) / "synthetic", args.pairs,
                              "synthetic cardiac MRI (kpssl.data.synthetic, 2 patients, paper_acdc)", True)
            extra = measure(textured, settings, Path(folder) / "textured", args.pairs,
                            "textured noise, K saturated", False)
            summary.update({f"textured_{key}": value for key, value in extra.items()})
    print(json.dumps({key: round(value, 3) for key, value in summary.items()}))


if __name__ == "__main__":
    main()
