"""Data: NIfTI I/O, the ACDC and Decathlon layouts, synthetic data, preprocessing, slices and splits."""

from .layouts import ACDC_LABELS, Case, acdc_cases, decathlon_cases, detect_layout, find_cases, read_info_cfg
from .nifti import DataError, Volume, read_volume, write_volume
from .preprocess import center_pad_crop, clip_percentiles, preprocess_volume, resample_inplane, zscore
from .slices import (
    FoldCases, LabelledSlices, PreparedVolume, fold_cases, load_volumes, prepare_case, slice_index, slice_partition,
    slice_position,
)
from .splits import FoldSplit, fold_split, labelled_subset, patient_folds

__all__ = [
    "ACDC_LABELS", "Case", "acdc_cases", "decathlon_cases", "detect_layout", "find_cases", "read_info_cfg",
    "DataError", "Volume", "read_volume", "write_volume",
    "center_pad_crop", "clip_percentiles", "preprocess_volume", "resample_inplane", "zscore",
    "LabelledSlices", "PreparedVolume", "load_volumes", "prepare_case", "slice_index", "slice_partition",
    "slice_position", "FoldCases", "fold_cases", "FoldSplit", "fold_split", "labelled_subset", "patient_folds",
]
