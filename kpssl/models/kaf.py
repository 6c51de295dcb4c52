"""The KAF layer: keypoint-augmented fusion of one encoder level (Yang et al., 2023).

For encoder level l (stride s = 2**(l-1)) with dense features F_l (B, C_l, H_l, W_l) and keypoints p
(B, K, 2) as float (row, col) at full resolution, the layer

1. samples F_l at the keypoints (nearest pixel, or bilinear) -> (B, K, C_l) and projects to d (1x1 linear);
2. adds a position encoding of the normalised coordinates (p - size/2) / (0.7 max(H, W)) (full-resolution
   p and image size; the authors divide both by 2**(l-1) first, the same up to their integer division);
3. refines the K descriptors with T self-attention blocks (:class:`~kpssl.models.attention.AttentionBlock`);
4. puts each refined vector back at its keypoint's pixel of an all-zero (B, d, H_l, W_l) map (keypoints
   sharing a pixel are averaged), spreads it with D_l = Conv3x3(d -> hidden) -> BN -> ReLU ->
   Conv3x3(hidden -> C_l) and concatenates [F_l, D_l] -> (B, 2 C_l, H_l, W_l).

Pixel convention (CONTRIBUTING): pixel centres at integer coordinates, so full-resolution pixel r covers
[r - 0.5, r + 0.5) and level-l pixel i pools full-resolution pixels i s .. i s + s - 1. The level-l pixel
holding p is therefore floor((p + 0.5) / s); for the authors' integer keypoints this is exactly their
integer division p // s. Bilinear sampling places level-l pixel i's centre at full-resolution coordinate
i s + (s - 1) / 2.

D_l only ever sees a map that is zero except at K pixels, so by default it is computed from the
keypoints alone (:mod:`kpssl.models.sparse`: the first convolution as one (B K, d) x (d, 9 hidden)
product scattered into 3 x 3 neighbourhoods, BatchNorm and ReLU on a map that is constant except near
keypoints, the second convolution back to a dense map); :func:`scatter_average` followed by the dense
layers is the reference path (``sparse_fusion=False``).

No keypoints (K = 0 or all invalid): the scattered map is exactly zero, so the first convolution outputs
its bias everywhere and D_l = Conv(ReLU(BN(bias))) is the layer's learned keypoint-free map: the same for
every such image in evaluation mode, and containing no keypoint information. "Zero contribution" means
this: the keypoints add nothing, not that the D_l channels are zero.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kpssl.models.attention import AttentionBlock, KeypointPositionEncoder, keypoint_mask, normalize_keypoints
from kpssl.models.sparse import densify, sparse_batch_norm_relu, sparse_conv3x3_dense, spread_keypoints

__all__ = [
    "check_keypoints",
    "level_pixels",
    "sample_nearest",
    "sample_bilinear",
    "scatter_average",
    "KeypointFusion",
    "KAFOutput",
    "KAFLayer",
]

SAMPLING = ("nearest", "bilinear")


def check_keypoints(keypoints: Tensor, valid: Tensor, batch: int | None = None) -> None:
    """Raise ``ValueError`` unless keypoints are float (B, K, 2) and valid is bool (B, K)."""
    if keypoints.ndim != 3 or keypoints.shape[-1] != 2 or not keypoints.is_floating_point():
        raise ValueError(f"expected float keypoints (B, K, 2), got {keypoints.dtype} {tuple(keypoints.shape)}")
    if valid.dtype != torch.bool or valid.shape != keypoints.shape[:2]:
        raise ValueError(f"expected bool valid {tuple(keypoints.shape[:2])}, got {valid.dtype} {tuple(valid.shape)}")
    if batch is not None and keypoints.shape[0] != batch:
        raise ValueError(f"expected keypoints for {batch} images, got {keypoints.shape[0]}")


def level_pixels(keypoints: Tensor, stride: int, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Level pixel (row, col) holding each keypoint: floor((p + 0.5) / stride), clamped into the map.

    keypoints (B, K, 2) float at full resolution -> rows, cols (B, K) int64 in [0, height), [0, width).
    """
    index = torch.floor((keypoints + 0.5) / stride).long()  # (B, K, 2)
    return index[..., 0].clamp(0, height - 1), index[..., 1].clamp(0, width - 1)


def sample_nearest(features: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Read features (B, C, H, W) at integer pixels rows, cols (B, K) -> (B, K, C)."""
    batch, channels, _, width = features.shape
    flat = (rows * width + cols).unsqueeze(1).expand(-1, channels, -1)  # (B, C, K)
    return features.flatten(2).gather(2, flat).transpose(1, 2)  # (B, K, C)


def sample_bilinear(features: Tensor, keypoints: Tensor, stride: int) -> Tensor:
    """Bilinear read of features (B, C, H, W) at full-resolution keypoints (B, K, 2) -> (B, K, C).

    Level pixel i's centre is full-resolution coordinate i s + (s - 1) / 2; outside the map the border
    value is used.
    """
    height, width = features.shape[-2:]
    size = keypoints.new_tensor([height, width])
    grid = ((keypoints + 0.5) / stride) / size * 2 - 1  # (B, K, 2), align_corners=False convention
    grid = grid.flip(-1).unsqueeze(1)  # (B, 1, K, 2) as (x = col, y = row)
    sampled = F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return sampled.squeeze(2).transpose(1, 2)  # (B, K, C)


def scatter_average(vectors: Tensor, rows: Tensor, cols: Tensor, valid: Tensor, height: int, width: int) -> Tensor:
    """Dense keypoint map: valid vectors (B, K, d) placed at their pixels, collisions averaged.

    Returns (B, d, H, W), zero where no valid keypoint lies. The dense reference for the sparse fusion.
    """
    batch, count, dim = vectors.shape
    flat = (torch.arange(batch, device=rows.device).unsqueeze(1) * (height * width) + rows * width + cols).reshape(-1)
    values = torch.where(valid.unsqueeze(-1), vectors, 0.0).reshape(-1, dim)  # (B K, d)
    sums = vectors.new_zeros(batch * height * width, dim).index_add(0, flat, values)  # (B H W, d)
    counts = vectors.new_zeros(batch * height * width).index_add(0, flat, valid.reshape(-1).to(vectors.dtype))
    average = sums / counts.clamp_min(1.0).unsqueeze(1)  # (B H W, d)
    return average.view(batch, height, width, dim).permute(0, 3, 1, 2)  # (B, d, H, W)


class KeypointFusion(nn.Module):
    """D_l: Conv3x3(d -> hidden) -> BatchNorm -> ReLU -> Conv3x3(hidden -> C_l) over the keypoint map.

    ``forward(vectors (B, K, d), rows, cols (B, K), valid (B, K), height, width) -> (B, C_l, H, W)``.

    With ``sparse`` (default) the first convolution is computed from the keypoints
    (:func:`~kpssl.models.sparse.spread_keypoints`); where the 9 K taps cover less than half the map the
    BatchNorm, ReLU and second convolution are sparse too, otherwise (coarse levels) they run densely on
    the densified map, which is then faster. Without ``sparse`` the averaged keypoint map is built densely
    and run through the layers: the reference. All paths give the same outputs, gradients and BatchNorm
    statistics up to float rounding.
    """

    def __init__(self, dim: int, hidden: int, out_channels: int, sparse: bool = True) -> None:
        super().__init__()
        self.spread = nn.Conv2d(dim, hidden, 3, padding=1)
        self.norm = nn.BatchNorm2d(hidden)
        self.out = nn.Conv2d(hidden, out_channels, 3, padding=1)
        self.sparse = sparse

    def forward(self, vectors: Tensor, rows: Tensor, cols: Tensor, valid: Tensor, height: int, width: int) -> Tensor:
        if not self.sparse:
            keypoint_map = scatter_average(vectors, rows, cols, valid, height, width)  # (B, d, H, W)
            return self.out(F.relu(self.norm(self.spread(keypoint_map))))  # (B, C_l, H, W)
        spread = spread_keypoints(vectors, rows, cols, valid, self.spread.weight, self.spread.bias, height, width)
        if 2 * 9 * vectors.shape[1] >= height * width:  # taps cover much of the map: dense from here
            return self.out(F.relu(self.norm(densify(spread))))  # (B, C_l, H, W)
        norm = self.norm
        momentum = norm.momentum
        if norm.training and norm.track_running_stats:
            norm.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average, as BatchNorm2d
                momentum = 1.0 / float(norm.num_batches_tracked)
        activated = sparse_batch_norm_relu(spread, norm.weight, norm.bias, norm.running_mean, norm.running_var,
                                           norm.training or not norm.track_running_stats,
                                           0.0 if momentum is None else momentum, norm.eps)
        return sparse_conv3x3_dense(activated, self.out.weight, self.out.bias)  # (B, C_l, H, W)


class KAFOutput(NamedTuple):
    """What a KAF layer returns."""

    features: Tensor  # (B, 2 C_l, H_l, W_l): [F_l, D_l]
    keypoint_features: Tensor  # (B, K, d) after the attention blocks
    attention: list[Tensor] | None  # per block (B, heads, K, K), only when requested


class KAFLayer(nn.Module):
    """Keypoint-augmented fusion for one encoder level (Yang et al., 2023).

    Args:
        channels: C_l, channels of the level's features.
        stride: 2**(l-1), the level's downsampling factor.
        dim: d, the keypoint descriptor width (paper: 256).
        blocks: T, self-attention blocks (paper: 16).
        heads: attention heads (paper: 4).
        fusion_hidden: hidden width of D_l (paper: 64).
        sampling: "nearest" (paper) or "bilinear".
        sparse_fusion: compute D_l from the keypoints (default) or densely (the reference).

    ``forward(features (B, C_l, H_l, W_l), keypoints (B, K, 2), valid (B, K), image_size (H, W),
    need_weights=False) -> KAFOutput``. Padded keypoints (``valid`` False) are ignored: their
    coordinates may hold anything, including NaN.
    """

    def __init__(self, channels: int, stride: int, dim: int = 256, blocks: int = 16, heads: int = 4,
                 fusion_hidden: int = 64, sampling: str = "nearest", sparse_fusion: bool = True) -> None:
        super().__init__()
        if sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
        for name, value in (("channels", channels), ("stride", stride), ("dim", dim), ("heads", heads),
                            ("fusion_hidden", fusion_hidden)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if blocks < 0:
            raise ValueError(f"blocks must be >= 0, got {blocks}")
        self.stride, self.sampling = stride, sampling
        self.project = nn.Linear(channels, dim)  # the 1x1 linear layer C_l -> d
        self.position = KeypointPositionEncoder(dim)
        self.blocks = nn.ModuleList(AttentionBlock(dim, heads) for _ in range(blocks))
        self.fusion = KeypointFusion(dim, fusion_hidden, channels, sparse_fusion)

    def forward(self, features: Tensor, keypoints: Tensor, valid: Tensor, image_size: tuple[int, int],
                need_weights: bool = False) -> KAFOutput:
        check_keypoints(keypoints, valid, features.shape[0])
        height, width = features.shape[-2:]
        keypoints = keypoints.to(self.project.weight.dtype)  # coordinates in the parameters' precision
        keypoints = torch.where(valid.unsqueeze(-1), keypoints, 0.0)  # padded entries may hold garbage
        rows, cols = level_pixels(keypoints, self.stride, height, width)  # (B, K) each
        if self.sampling == "nearest":
            sampled = sample_nearest(features, rows, cols)  # (B, K, C_l)
        else:
            sampled = sample_bilinear(features, keypoints, self.stride)  # (B, K, C_l)
        mask = keypoint_mask(valid, self.project.weight.dtype)  # shared by all masked BatchNorms and attentions
        x = self.project(sampled)  # (B, K, d)
        x = x + self.position(normalize_keypoints(keypoints, image_size), mask)
        attention: list[Tensor] | None = [] if need_weights else None
        for block in self.blocks:
            x, weights = block(x, mask, need_weights=need_weights)  # (B, K, d)
            if attention is not None and weights is not None:
                attention.append(weights)
        spread = self.fusion(x, rows, cols, valid, height, width)  # (B, C_l, H_l, W_l)
        return KAFOutput(torch.cat([features, spread], dim=1), x, attention)
