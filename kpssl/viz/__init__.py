"""Figures and widgets used by the chapters."""

from .slices import LABEL_COLOURS, legend_handles, overlay, show_slice, slice_browser, slice_grid, stack_figure

__all__ = ["LABEL_COLOURS", "legend_handles", "overlay", "show_slice", "slice_browser", "slice_grid", "stack_figure"]
