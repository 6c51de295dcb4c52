"""Projection and matching heads of the self-supervised objectives (the paper's Eqs. 1-2).

* :class:`BottleneckProjection`: the global vector g of L_PCL from the bottleneck (Eq. 1).
* :class:`KeypointGlobalHead`: the global vector g of L_global from the keypoint features (Eq. 1); its
  level fusion (concatenate the levels' keypoint features, project to d) also gives the per-keypoint
  descriptors that feed the matching head, as in the authors' code.
* :class:`MatchingHead` + :func:`matching_scores`: descriptors of two neighbouring slices and their score
  matrix S_ab = <d_a, d_b> / sqrt(d), the input of the Sinkhorn matching loss (Eq. 2, in ``kpssl.losses``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kpssl.models.attention import AttentionBlock, KeypointPositionEncoder, keypoint_mask, normalize_keypoints
from kpssl.models.kaf import check_keypoints
from kpssl.settings import ModelSettings

__all__ = ["BottleneckProjection", "masked_mean", "KeypointGlobalHead", "MatchingHead", "matching_scores"]


class BottleneckProjection(nn.Module):
    """Global average pool -> Linear(in, hidden) -> ReLU -> Linear(hidden, projection_dim) [L_PCL, Eq. 1].

    For the plain UNet in = hidden = 16f; for the KAF-UNet (bottleneck 32f) the authors use in = 32f,
    hidden = 16f. ``forward(bottleneck (B, in, h, w)) -> (B, projection_dim)``.
    """

    def __init__(self, in_channels: int, hidden: int, projection_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),  # (B, in)
            nn.Linear(in_channels, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, projection_dim),
        )

    @classmethod
    def from_settings(cls, settings: ModelSettings, in_channels: int) -> "BottleneckProjection":
        """Hidden width 16f and ``settings.projection_dim`` outputs for a bottleneck of ``in_channels``."""
        return cls(in_channels, 16 * settings.width, settings.projection_dim)

    def forward(self, bottleneck: Tensor) -> Tensor:
        if bottleneck.ndim != 4:
            raise ValueError(f"expected bottleneck features (B, C, h, w), got {tuple(bottleneck.shape)}")
        return self.net(bottleneck)


def masked_mean(x: Tensor, valid: Tensor) -> Tensor:
    """Mean of x (B, K, C) over valid keypoints (B, K) -> (B, C); zero for an image without keypoints."""
    weights = valid.unsqueeze(-1).to(x.dtype)  # (B, K, 1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class KeypointGlobalHead(nn.Module):
    """Keypoint global vector [L_global, Eq. 1].

    concat the levels' keypoint features (B, K, n d) -> Linear(n d, d) (the "1x1 linear")
    -> mean over valid keypoints (B, d) -> Linear(d, d) -> BatchNorm -> ReLU -> Linear(d, projection_dim).

    ``forward(level_features [n x (B, K, d)], valid (B, K)) -> (B, projection_dim)``. The BatchNorm is
    over the batch, so training needs B >= 2.
    """

    def __init__(self, levels: int, dim: int, projection_dim: int) -> None:
        super().__init__()
        if levels < 1:
            raise ValueError(f"the keypoint global head needs at least one KAF level, got {levels}")
        self.levels = levels
        self.fuse = nn.Linear(levels * dim, dim)
        self.project = nn.Sequential(
            nn.Linear(dim, dim),
            nn.BatchNorm1d(dim),
            nn.ReLU(inplace=True),
            nn.Linear(dim, projection_dim),
        )

    @classmethod
    def from_settings(cls, settings: ModelSettings) -> "KeypointGlobalHead":
        return cls(sum(map(bool, settings.kaf_levels)), settings.descriptor_dim, settings.projection_dim)

    def fuse_levels(self, level_features: Sequence[Tensor]) -> Tensor:
        """[n x (B, K, d)] -> per-keypoint descriptors (B, K, d); the matching head's input."""
        if len(level_features) != self.levels:
            raise ValueError(f"expected keypoint features of {self.levels} levels, got {len(level_features)}")
        return self.fuse(torch.cat(list(level_features), dim=-1))  # (B, K, d)

    def pool(self, descriptors: Tensor, valid: Tensor) -> Tensor:
        """Descriptors (B, K, d) from :meth:`fuse_levels` -> global vector (B, projection_dim)."""
        return self.project(masked_mean(descriptors, valid))

    def forward(self, level_features: Sequence[Tensor], valid: Tensor) -> Tensor:
        return self.pool(self.fuse_levels(level_features), valid)


class MatchingHead(nn.Module):
    """Descriptors for the optimal-transport matching loss (the paper's Eq. 2).

    Adds a position encoding (its own MLP) to both slices' descriptors, runs ``blocks`` attention blocks
    alternating self (even) and cross (odd) between the slices, each slice updated from the other's
    previous state, and projects with a final Linear(d, d). Padded keypoints take no part.

    ``forward(desc_a (B, Ka, d), keypoints_a (B, Ka, 2), valid_a (B, Ka), desc_b, keypoints_b, valid_b,
    image_size (H, W)) -> (B, Ka, d), (B, Kb, d)``.
    """

    def __init__(self, dim: int, heads: int, blocks: int) -> None:
        super().__init__()
        if blocks < 0:
            raise ValueError(f"blocks must be >= 0, got {blocks}")
        self.position = KeypointPositionEncoder(dim)
        self.blocks = nn.ModuleList(AttentionBlock(dim, heads) for _ in range(blocks))
        self.final = nn.Linear(dim, dim)

    @classmethod
    def from_settings(cls, settings: ModelSettings) -> "MatchingHead":
        return cls(settings.descriptor_dim, settings.heads, settings.matching_blocks)

    def forward(self, desc_a: Tensor, keypoints_a: Tensor, valid_a: Tensor, desc_b: Tensor, keypoints_b: Tensor,
                valid_b: Tensor, image_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        check_keypoints(keypoints_a, valid_a)
        check_keypoints(keypoints_b, valid_b, keypoints_a.shape[0])
        if desc_a.shape[:2] != keypoints_a.shape[:2] or desc_b.shape[:2] != keypoints_b.shape[:2]:
            raise ValueError(f"descriptors {tuple(desc_a.shape)}, {tuple(desc_b.shape)} do not match keypoints "
                             f"{tuple(keypoints_a.shape)}, {tuple(keypoints_b.shape)}")
        dtype = self.final.weight.dtype  # coordinates in the parameters' precision; padding may hold garbage
        keypoints_a = torch.where(valid_a.unsqueeze(-1), keypoints_a.to(dtype), 0.0)
        keypoints_b = torch.where(valid_b.unsqueeze(-1), keypoints_b.to(dtype), 0.0)
        mask_a, mask_b = keypoint_mask(valid_a, dtype), keypoint_mask(valid_b, dtype)
        a = desc_a + self.position(normalize_keypoints(keypoints_a, image_size), mask_a)  # (B, Ka, d)
        b = desc_b + self.position(normalize_keypoints(keypoints_b, image_size), mask_b)  # (B, Kb, d)
        for index, block in enumerate(self.blocks):
            if index % 2 == 0:  # self
                a, b = block(a, mask_a)[0], block(b, mask_b)[0]
            else:  # cross
                a, b = block(a, mask_a, b, mask_b)[0], block(b, mask_b, a, mask_a)[0]
        return self.final(a), self.final(b)


def matching_scores(desc_a: Tensor, desc_b: Tensor) -> Tensor:
    """S_ab = <d_a, d_b> / sqrt(d): (B, Ka, d), (B, Kb, d) -> (B, Ka, Kb). Padded rows are not masked."""
    if desc_a.shape[-1] != desc_b.shape[-1]:
        raise ValueError(f"descriptor widths differ: {desc_a.shape[-1]} and {desc_b.shape[-1]}")
    return desc_a @ desc_b.transpose(1, 2) / math.sqrt(desc_a.shape[-1])
