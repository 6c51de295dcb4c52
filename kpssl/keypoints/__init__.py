"""Keypoints (the paper's keypoints and correspondences): SIFT with a cache, exact tracking through augmentation, correspondences.

Modules, in pipeline order:

* :mod:`.detect`     SIFT on a preprocessed slice, the K strongest, (row, col) with integer pixel centres;
* :mod:`.cache`      detection and correspondences once per volume, stored beside the data;
* :mod:`.correspond` mutual nearest-neighbour correspondences between neighbouring slices, and how a
  neighbour is drawn;
* :mod:`.augment`    crop, mirrors, elastic + rotation + scale in one ``grid_sample``, keypoints moved
  exactly by the same map;
* :mod:`.datasets`   pretraining pairs and labelled slices with fixed-K keypoint batches.
"""

from .augment import (AugmentedView, ViewTransform, apply_transform, augment_view, centre_transform, elastic_field,
                      sample_transform, warp_image, warp_label, warp_points)
from .cache import CACHE_FOLDER, KeypointCache, VolumeKeypoints, default_cache_dir, fill_cache, load_all
from .correspond import (Correspondences, descriptor_distances, manhattan_distances, match_slices, mutual_matches,
                         neighbour_pairs, neighbour_slice, restrict_matches)
from .datasets import (LabelledKeypointSlices, PairDataset, check_pair_batch, collate_keypoints, collate_labelled,
                       collate_pairs, pad_keypoints, pad_matches, pair_views)
from .detect import SIFT_PIXEL_OFFSET, SliceKeypoints, detect_keypoints, detect_volume, to_uint8

__all__ = [
    "SliceKeypoints", "SIFT_PIXEL_OFFSET", "detect_keypoints", "detect_volume", "to_uint8",
    "CACHE_FOLDER", "KeypointCache", "VolumeKeypoints", "default_cache_dir", "fill_cache", "load_all",
    "Correspondences", "descriptor_distances", "manhattan_distances", "match_slices", "mutual_matches",
    "neighbour_pairs", "neighbour_slice", "restrict_matches",
    "AugmentedView", "ViewTransform", "apply_transform", "augment_view", "centre_transform", "elastic_field",
    "sample_transform", "warp_image", "warp_label", "warp_points",
    "LabelledKeypointSlices", "PairDataset", "check_pair_batch", "collate_keypoints", "collate_pairs", "collate_labelled",
    "pad_keypoints", "pad_matches", "pair_views",
]
