"""Figures and widgets used by the chapters."""

from .attention import keypoint_attention, keypoint_attention_widget
from .keypoints import augmentation_widget, chosen_transform, patch_outline, tracked_keypoints
from .objectives import assignment_matrix, sinkhorn_explorer, transport_plan
from .slices import LABEL_COLOURS, legend_handles, overlay, show_slice, slice_browser, slice_grid, stack_figure

__all__ = ["keypoint_attention", "keypoint_attention_widget", "augmentation_widget", "chosen_transform", "patch_outline", "tracked_keypoints", "assignment_matrix", "sinkhorn_explorer", "transport_plan", "LABEL_COLOURS", "legend_handles", "overlay", "show_slice", "slice_browser", "slice_grid", "stack_figure"]
