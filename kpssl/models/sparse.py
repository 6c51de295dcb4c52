"""Sparse fusion: the KAF layer's D_l computed from the keypoints alone (the KAF layer's fusion step).

D_l = Conv3x3 -> BatchNorm -> ReLU -> Conv3x3 runs over a map that is zero except at the K keypoint
pixels. Every intermediate map is then *constant except at a few pixels*: a :class:`SparseMap` holds the
constant (``background``, one value per channel) and the deviations from it at listed pixels. The three
steps of D_l map such maps to such maps, at a cost that does not depend on the image size:

1. :func:`spread_keypoints`: the first convolution. A vector v at pixel (r, c) adds W[:, :, ky, kx] v to
   pixel (r + 1 - ky, c + 1 - kx); all K x 9 taps are one (B K, d) x (d, 9 hidden) product. Keypoints
   that share a pixel are averaged (each vector divided by its collision count), and taps that land on
   the same pixel are summed into one entry (:func:`merge_duplicate_pixels`), so listed pixels are unique.
   Taps that fall off the image, those of invalid keypoints and merged duplicates are listed off the map (row ``-2``, so
   that every tap of theirs is off the map too) with value 0. Background: the bias.
2. :func:`sparse_batch_norm_relu`: BatchNorm statistics over all B H W pixels follow from the background
   and the listed deviations (mean = b + sum(dev) / M, var = sum(dev^2) / M - (sum(dev) / M)^2);
   BatchNorm and ReLU act on the background and on each listed pixel.
3. :func:`sparse_conv3x3_dense`: the second convolution, back to a dense (B, C_l, H, W) map: the
   convolution of the constant background (border pixels see the zero padding) plus the listed
   deviations scattered through the 9 taps.

:func:`sparse_conv3x3` is step 1 made dense: "scatter each keypoint's d-vector times the 9
kernel taps". Tests check all of it against the dense convolutions, forward and backward.

Scatters (GPU cost). Every scatter adds whole C-vectors: the dense result is accumulated in a
pixel-major (B H W, C) buffer with one ``index_add_`` over rows, and returned as a (B, C, H, W) view
in channels_last strides (the values are those of the NCHW convolution; ``torch.cat`` or a
``.contiguous()`` gives NCHW memory if wanted). Entries that must not count (off-image taps, invalid
keypoints) are masked to zero and sent to rows spread over the whole buffer, never to one shared spare
element: the only atomic additions that meet on one address are those of genuinely overlapping taps.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SparseMap",
    "collision_counts",
    "merge_duplicate_pixels",
    "spread_keypoints",
    "densify",
    "sparse_conv3x3",
    "sparse_batch_norm_relu",
    "sparse_conv3x3_dense",
]


class SparseMap(NamedTuple):
    """A (B, C, height, width) map equal to ``background`` except at listed pixels.

    Listed pixels are unique within an image, or carry a zero deviation.
    """

    background: Tensor  # (C,)
    values: Tensor  # (B, N, C) deviation from the background at the listed pixels
    rows: Tensor  # (B, N) int64
    cols: Tensor  # (B, N) int64
    height: int
    width: int


# The row of dropped entries: two rows above the map, so that all nine taps of such an entry
# (rows -1, -2, -3) are off the map as well.
_OFF_MAP = -2


def collision_counts(rows: Tensor, cols: Tensor, valid: Tensor) -> Tensor:
    """For each keypoint, how many valid keypoints of its image share its pixel (at least 1) -> (B, K) int64."""
    pixel = torch.stack([rows, cols], dim=-1)  # (B, K, 2)
    same = (pixel.unsqueeze(2) == pixel.unsqueeze(1)).all(dim=-1) & valid.unsqueeze(1)  # (B, K, K)
    return same.sum(dim=-1).clamp_min(1)


def _tap_pixels(rows: Tensor, cols: Tensor, height: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pixels (r + 1 - ky, c + 1 - kx) reached by the 9 taps of a 3x3 kernel from (r, c).

    rows, cols (B, N) -> tap rows, tap cols (B, N, 3, 3) and ``inside`` (B, N, 3, 3) bool; index [.., ky, kx].
    """
    offsets = torch.arange(3, device=rows.device)
    tap_rows = (rows.unsqueeze(-1) + 1 - offsets).unsqueeze(-1)  # (B, N, 3, 1)
    tap_cols = (cols.unsqueeze(-1) + 1 - offsets).unsqueeze(-2)  # (B, N, 1, 3)
    inside = (tap_rows >= 0) & (tap_rows < height) & (tap_cols >= 0) & (tap_cols < width)  # (B, N, 3, 3)
    return tap_rows.expand_as(inside), tap_cols.expand_as(inside), inside


def _inside(rows: Tensor, cols: Tensor, height: int, width: int) -> Tensor:
    return (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)


def _merge(values: Tensor, rows: Tensor, cols: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """:func:`merge_duplicate_pixels`, also returning ``owner (B, N)`` bool: the entry that holds its pixel's sum."""
    batch, count, channels = values.shape
    image = torch.arange(batch, device=rows.device).unsqueeze(1)  # (B, 1)
    ids = torch.arange(batch * count, device=rows.device)
    inside = _inside(rows, cols, height, width).reshape(-1)  # (B N,)
    pixel = (image * (height * width) + rows * width + cols).reshape(-1)  # (B N,)
    slot = torch.where(inside, pixel, batch * height * width + ids)  # off-map entries: a slot of their own
    owner = torch.full((batch * height * width + batch * count,), -1, dtype=torch.long, device=rows.device)
    owner = owner.scatter_reduce(0, slot, ids, reduce="amax")[slot]  # (B N,) the entry id owning each slot
    merged = values.new_zeros(batch * count, channels).index_add(0, owner, values.reshape(-1, channels))
    return merged.view(batch, count, channels), (owner == ids).view(batch, count)  # (B, N, C), (B, N)


def merge_duplicate_pixels(values: Tensor, rows: Tensor, cols: Tensor, height: int, width: int) -> Tensor:
    """Sum the entries that share a pixel into one of them; the others become zero.

    values (B, N, C), rows, cols (B, N) -> (B, N, C). The entry kept is the one with the largest index,
    chosen without sorting or host synchronisation (a scatter-max of entry ids into a pixel map). Entries
    off the map are left as they are (each is its own slot, so none of them meet on one address).
    """
    return _merge(values, rows, cols, height, width)[0]


def spread_keypoints(vectors: Tensor, rows: Tensor, cols: Tensor, valid: Tensor, weight: Tensor,
                     bias: Tensor | None, height: int, width: int) -> SparseMap:
    """Conv3x3(weight, bias, padding 1) over the keypoint map, as a :class:`SparseMap` (step 1).

    Args:
        vectors: (B, K, d); rows, cols: (B, K) int64 pixels; valid: (B, K) bool (invalid ones are ignored).
        weight: (hidden, d, 3, 3); bias: (hidden,) or ``None``.

    Returns:
        background = bias, and B x 9K listed pixels: unique in the map; off-image taps, the taps of
        invalid keypoints and the duplicates merged into another entry listed at row -2 (off the map)
        with value 0.
    """
    batch, count, dim = vectors.shape
    hidden = weight.shape[0]
    if weight.shape != (hidden, dim, 3, 3):
        raise ValueError(f"expected a ({hidden}, {dim}, 3, 3) kernel, got {tuple(weight.shape)}")
    scale = collision_counts(rows, cols, valid).to(vectors.dtype)  # (B, K)
    scaled = torch.where(valid.unsqueeze(-1), vectors / scale.unsqueeze(-1), 0.0)  # (B, K, d): averaging
    taps = scaled @ weight.permute(1, 2, 3, 0).reshape(dim, 9 * hidden)  # (B, K, 9 hidden), tap-major
    tap_rows, tap_cols, inside = _tap_pixels(rows, cols, height, width)  # (B, K, 3, 3)
    keep = (inside & valid.view(batch, count, 1, 1)).view(batch, 9 * count)  # (B, 9K)
    tap_rows = torch.where(keep, tap_rows.reshape(batch, 9 * count), _OFF_MAP)  # dropped taps go off the map
    tap_cols = torch.where(keep, tap_cols.reshape(batch, 9 * count), 0)
    values = torch.where(keep.unsqueeze(-1), taps.view(batch, 9 * count, hidden), 0.0)  # ... with value 0
    values, owner = _merge(values, tap_rows, tap_cols, height, width)  # (B, 9K, hidden), (B, 9K)
    tap_rows = torch.where(owner, tap_rows, _OFF_MAP)  # merged duplicates (now zero) leave the map too
    background = bias if bias is not None else vectors.new_zeros(hidden)
    return SparseMap(background, values, tap_rows, tap_cols, height, width)


def _filled(planes: Tensor, batch: int) -> Tensor:
    """B copies of planes (C, H, W) in a pixel-major buffer -> (B H W, C)."""
    channels, height, width = planes.shape
    buffer = planes.new_empty(batch * height * width, channels)  # a fresh tensor: the scatter may write into it
    buffer.view(batch, height, width, channels).copy_(planes.permute(1, 2, 0).expand(batch, height, width, channels))
    return buffer


def _scatter_into(buffer: Tensor, shape: tuple[int, int, int, int], rows: Tensor, cols: Tensor,
                  keep: Tensor, values: Tensor) -> Tensor:
    """Add C-vectors values (B, ..., C) at pixels rows, cols (B, ...) of a (B H W, C) buffer -> (B, C, H, W).

    One ``index_add_`` over rows: each addition is a whole C-vector of one pixel. Entries with ``keep``
    False add a zero vector to a row of their own choosing (entry i to row i mod B H W), so they spread
    over the buffer instead of piling onto one address. The result is a view of the buffer with
    channels_last strides.
    """
    batch, channels, height, width = shape
    image = torch.arange(batch, device=rows.device).view(batch, *([1] * (rows.ndim - 1)))
    pixel = (image * (height * width) + rows * width + cols).reshape(-1)  # (B ...,) row of the buffer
    keep = keep.reshape(-1)
    spread = torch.arange(pixel.shape[0], device=rows.device) % buffer.shape[0]
    pixel = torch.where(keep, pixel, spread)
    values = values.reshape(-1, channels).to(buffer.dtype)  # (B ..., C); under autocast the dtypes may differ
    values = torch.where(keep.unsqueeze(-1), values, 0.0)
    buffer = buffer.index_add_(0, pixel, values)  # (B H W, C)
    return buffer.view(batch, height, width, channels).permute(0, 3, 1, 2)  # (B, C, H, W), channels_last strides


def densify(sparse: SparseMap) -> Tensor:
    """The dense (B, C, H, W) map a :class:`SparseMap` stands for (channels_last strides)."""
    background, values, rows, cols, height, width = sparse
    batch, count, channels = values.shape
    buffer = _filled(background.view(channels, 1, 1).expand(channels, height, width), batch)  # (B H W, C)
    return _scatter_into(buffer, (batch, channels, height, width), rows, cols, _inside(rows, cols, height, width),
                         values)


def sparse_conv3x3(vectors: Tensor, rows: Tensor, cols: Tensor, valid: Tensor, weight: Tensor, bias: Tensor | None,
                   height: int, width: int) -> Tensor:
    """``conv2d(scatter_average(...), weight, bias, padding=1)`` from the keypoints alone -> (B, hidden, H, W).

    Work: one (B K, d) x (d, 9 hidden) product and a scatter of B K 9 hidden values, instead of a dense
    convolution over H W pixels (the dense map is only written once, for the output).
    """
    return densify(spread_keypoints(vectors, rows, cols, valid, weight, bias, height, width))


def sparse_batch_norm_relu(sparse: SparseMap, weight: Tensor | None, bias: Tensor | None,
                           running_mean: Tensor | None, running_var: Tensor | None, training: bool,
                           momentum: float, eps: float) -> SparseMap:
    """ReLU(BatchNorm2d(map)) of a :class:`SparseMap` with unique listed pixels (step 2).

    Training (or no running statistics): statistics over all B H W pixels, running statistics updated in
    place as ``torch.nn.BatchNorm2d`` does (unbiased variance); otherwise the running statistics.
    """
    background, values, rows, cols, height, width = sparse
    values = values.to(background.dtype)  # statistics in the background's (the parameters') precision
    if training or running_mean is None or running_var is None:
        pixels = values.shape[0] * height * width
        mean_deviation = values.sum(dim=(0, 1)) / pixels  # (C,)
        var = (values.square().sum(dim=(0, 1)) / pixels - mean_deviation.square()).clamp_min(0.0)  # biased
        mean = background + mean_deviation
        if training and running_mean is not None and running_var is not None:
            with torch.no_grad():
                running_mean.lerp_(mean.to(running_mean.dtype), momentum)
                running_var.lerp_((var * pixels / max(pixels - 1, 1)).to(running_var.dtype), momentum)
    else:
        mean, var = running_mean, running_var
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale if bias is None else bias - mean * scale  # BN(x) = x * scale + shift
    new_background = F.relu(background * scale + shift)  # (C,)
    new_values = F.relu((background + values) * scale + shift) - new_background  # (B, N, C), zero stays zero
    return SparseMap(new_background, new_values, rows, cols, height, width)


def sparse_conv3x3_dense(sparse: SparseMap, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``conv2d(densify(sparse), weight, bias, padding=1)`` -> (B, C_out, H, W) (step 3).

    The constant background contributes sum over in-image taps of W[:, :, ky, kx] background (all 9 taps
    inside the image, fewer on its border); each listed deviation is scattered through the 9 taps.
    """
    background, values, rows, cols, height, width = sparse
    batch, count, channels = values.shape
    out_channels = weight.shape[0]
    if weight.shape != (out_channels, channels, 3, 3):
        raise ValueError(f"expected a ({out_channels}, {channels}, 3, 3) kernel, got {tuple(weight.shape)}")
    device = rows.device
    # background: (C_out, 3, 3) tap responses, summed over the taps that stay inside the image
    tap_response = torch.einsum("oikl,i->okl", weight, background)  # (C_out, 3, 3)
    offsets = torch.arange(3, device=device)
    source_rows = torch.arange(height, device=device).unsqueeze(1) + offsets - 1  # (H, 3): row y + ky - 1
    source_cols = torch.arange(width, device=device).unsqueeze(1) + offsets - 1  # (W, 3)
    row_inside = (source_rows >= 0) & (source_rows < height)
    col_inside = (source_cols >= 0) & (source_cols < width)
    constant = torch.einsum("yk,xl,okl->oyx", row_inside.to(weight.dtype), col_inside.to(weight.dtype),
                            tap_response)  # (C_out, H, W)
    if bias is not None:
        constant = constant + bias.view(out_channels, 1, 1)
    buffer = _filled(constant, batch)  # (B H W, C_out)
    # deviations: each listed pixel through the 9 taps; off-image taps are masked
    contributions = values @ weight.permute(1, 2, 3, 0).reshape(channels, 9 * out_channels)  # (B, N, 9 C_out)
    tap_rows, tap_cols, inside = _tap_pixels(rows, cols, height, width)  # (B, N, 3, 3)
    return _scatter_into(buffer, (batch, out_channels, height, width), tap_rows, tap_cols, inside,
                         contributions.view(batch, count, 3, 3, out_channels))  # (B, C_out, H, W)
