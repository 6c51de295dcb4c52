"""What keypoint attention does: how peaked its rows are, how local, how stable under augmentation.

The attention weights of a KAF layer's block are ``a_ij = softmax_j(z_ij)`` over the valid keypoints
of one slice, with logits ``z_ij = q_i . k_j / sqrt(e)`` (chapter 4; the paper's attention step of
the KAF layer). This module reads them out of a network and summarises them:

* :func:`kaf_attention`: weights and logits of every KAF level and block, ``(B, heads, K, K)`` each;
* :func:`row_statistics`: the normalised entropy ``H(a_i) / log n`` of every row, its small-logit
  prediction ``1 - s_i^2 / (2 log n)`` from the spread ``s_i`` of the row's logits, and ``s_i``;
* :func:`attention_by_distance`: the mean relative attention ``n a_ij`` of pairs grouped by the
  Manhattan distance between the two keypoints (1 everywhere for uniform attention);
* :func:`row_stability`: the total variation between a keypoint's attention rows in two augmented
  views of the same slice, beside the distance to another keypoint's row.

Rows and keys are restricted to the valid keypoints (``valid`` (B, K) bool); a slice with fewer than
two valid keypoints has no rows. The functions are pure and compute in the dtype they are given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["KAFAttention", "kaf_attention", "RowStatistics", "row_statistics", "attention_by_distance",
           "row_stability", "total_variation"]


@dataclass
class KAFAttention:
    """Attention of every KAF level and block of one forward pass, on the CPU.

    ``weights[l][t]`` and ``logits[l][t]`` are ``(B, heads, K, K)`` for the l-th KAF level (1-based
    level ``levels[l]``, finest first) and block t; the weights are the softmax of the logits over the
    valid keys.
    """

    levels: tuple[int, ...]
    weights: list[list[Tensor]]
    logits: list[list[Tensor]]


@torch.no_grad()
def kaf_attention(network: nn.Module, image: Tensor, keypoints: Tensor, valid: Tensor) -> KAFAttention:
    """Run ``network.encode`` (a :class:`~kpssl.models.KAFUNet`) and keep every block's attention.

    Args:
        network: a KAF-UNet (or its backbone), in the mode it should be read in (``eval()`` usually).
        image: (B, 1, H, W); keypoints: (B, K, 2) as (row, col); valid: (B, K) bool; moved to the
            network's device.

    Returns:
        :class:`KAFAttention` with weights from ``encode(..., need_weights=True)`` and logits from each
        block's ``scores`` applied to the input the block received (a forward pre-hook records it).
    """
    if not hasattr(network, "kaf") or len(network.kaf) == 0:
        raise ValueError("expected a KAF-UNet with at least one KAF layer")
    device = next(network.parameters()).device
    inputs: dict[tuple[str, int], Tensor] = {}
    hooks = []
    for name, layer in network.kaf.items():
        for t, block in enumerate(layer.blocks):
            def record(module, args, key=(name, t)):  # args[0]: the block's input x (B, K, d)
                inputs[key] = args[0]
            hooks.append(block.register_forward_pre_hook(record))
    try:
        encoding = network.encode(image.to(device), keypoints.to(device), valid.to(device), need_weights=True)
    finally:
        for hook in hooks:
            hook.remove()
    weights = [[w.float().cpu() for w in level] for level in encoding.attention]
    logits = [[block.scores(inputs[(name, t)]).float().cpu() for t, block in enumerate(layer.blocks)]
              for name, layer in network.kaf.items()]
    return KAFAttention(tuple(encoding.levels), weights, logits)


def _check(weights: Tensor, valid: Tensor, name: str = "weights") -> None:
    if weights.ndim != 4 or weights.shape[-1] != weights.shape[-2]:
        raise ValueError(f"{name} must be (B, heads, K, K), got {tuple(weights.shape)}")
    if valid.dtype != torch.bool or tuple(valid.shape) != (weights.shape[0], weights.shape[-1]):
        raise ValueError(f"valid must be bool {(weights.shape[0], weights.shape[-1])}, got {valid.dtype} "
                         f"{tuple(valid.shape)}")


@dataclass
class RowStatistics:
    """One entry per valid query row of every slice with two or more valid keypoints and every head,
    ordered by (slice, head, query)."""

    entropy: Tensor  # H(a_i) / log n
    predicted: Tensor  # 1 - s_i^2 / (2 log n)
    spread: Tensor  # s_i: the standard deviation of the row's logits over the valid keys

    def means(self) -> tuple[float, float, float]:
        """(mean entropy, mean prediction, mean spread); NaN when there are no rows."""
        return tuple(float(x.mean()) if x.numel() else math.nan
                     for x in (self.entropy, self.predicted, self.spread))


def row_statistics(weights: Tensor, logits: Tensor, valid: Tensor) -> RowStatistics:
    """Normalised entropy of each attention row and its prediction from the logit spread.

    For a row with n valid keys, ``H = -sum_j a_ij log a_ij`` over the valid j, divided by ``log n``
    (1 for uniform attention). When the logits spread little around their mean,
    ``a_ij ~ (1 + z_ij - mean_j z_ij) / n`` and ``H ~ log n - s_i^2 / 2`` with ``s_i^2`` the (biased)
    variance of ``z_ij`` over the valid j, so ``H / log n ~ 1 - s_i^2 / (2 log n)``.

    Args:
        weights, logits: (B, heads, K, K); valid: (B, K) bool.
    """
    _check(weights, valid)
    _check(logits, valid, "logits")
    n = valid.sum(-1)  # (B,)
    keys = valid[:, None, None, :]  # (B, 1, 1, K)
    rows = (valid & (n >= 2)[:, None])[:, None, :].expand(-1, weights.shape[1], -1)  # (B, h, K)
    log_n = n.clamp_min(2).to(weights.dtype).log()[:, None, None]  # (B, 1, 1)
    a = torch.where(keys, weights, torch.zeros((), dtype=weights.dtype))
    plogp = torch.where(a > 0, a * a.clamp_min(torch.finfo(a.dtype).tiny).log(), torch.zeros_like(a))
    entropy = -plogp.sum(-1) / log_n  # (B, h, K)
    count = n.clamp_min(1).to(logits.dtype)[:, None, None]  # (B, 1, 1)
    z = torch.where(keys, logits, torch.zeros((), dtype=logits.dtype))
    mean = z.sum(-1, keepdim=True) / count[..., None]  # (B, h, K, 1)
    variance = torch.where(keys, (logits - mean).square(), torch.zeros((), dtype=logits.dtype)).sum(-1) / count
    return RowStatistics(entropy[rows], (1 - variance / (2 * log_n))[rows], variance.sqrt()[rows])


def attention_by_distance(weights: Tensor, keypoints: Tensor, valid: Tensor,
                          edges: np.ndarray | list[float]) -> tuple[Tensor, Tensor]:
    """Mean relative attention ``n a_ij`` (heads averaged, i != j) per bin of keypoint distance.

    The distance is Manhattan, ``|r_i - r_j| + |c_i - c_j|`` in pixels; pair (i, j) falls in bin b when
    ``edges[b] <= distance < edges[b + 1]`` (distances beyond the last edge go to the last bin). Uniform
    attention gives 1 in every bin.

    Args:
        weights: (B, heads, K, K); keypoints: (B, K, 2); valid: (B, K) bool; edges: increasing, at
            least two.

    Returns:
        (mean per bin, number of pairs per bin), each (len(edges) - 1,); a bin without pairs has mean 0.
    """
    _check(weights, valid)
    edges_t = torch.as_tensor(np.asarray(edges, dtype=float), dtype=weights.dtype)
    if edges_t.ndim != 1 or len(edges_t) < 2 or bool((edges_t[1:] <= edges_t[:-1]).any()):
        raise ValueError(f"edges must be increasing, at least two, got {list(np.asarray(edges))}")
    bins = len(edges_t) - 1
    n = valid.sum(-1)  # (B,)
    points = keypoints.to(weights.dtype)
    distance = (points[:, :, None] - points[:, None]).abs().sum(-1)  # (B, K, K)
    relative = n.to(weights.dtype)[:, None, None] * weights.mean(1)  # (B, K, K), heads averaged
    eye = torch.eye(valid.shape[1], dtype=torch.bool)
    pairs = valid[:, :, None] & valid[:, None, :] & ~eye & (n >= 2)[:, None, None]  # (B, K, K)
    index = (torch.bucketize(distance[pairs], edges_t, right=True) - 1).clamp(0, bins - 1)  # (pairs,)
    sums = torch.zeros(bins, dtype=weights.dtype).index_add_(0, index, relative[pairs])
    counts = torch.zeros(bins, dtype=weights.dtype).index_add_(0, index, torch.ones_like(relative[pairs]))
    return sums / counts.clamp_min(1), counts


def total_variation(p: Tensor, q: Tensor) -> Tensor:
    """``TV(p, q) = 1/2 sum_j |p_j - q_j|`` over the last axis (0 for equal, 1 for disjoint rows)."""
    return 0.5 * (p - q).abs().sum(-1)


def row_stability(first: Tensor, second: Tensor, valid1: Tensor, valid2: Tensor,
                  rng: np.random.Generator, minimum: int = 3) -> tuple[Tensor, Tensor]:
    """Total variation between each keypoint's attention rows in two views, and to another's row.

    Slot j is the same keypoint in both views (the augmentation moves keypoints, it does not reorder
    them). For each slice, over the n keypoints valid in both views (slices with fewer than
    ``minimum`` are skipped), the heads-averaged rows are restricted to those keypoints and
    renormalised to p_i (first view) and q_i (second view). ``own`` is ``TV(p_i, q_i)``; ``other`` is
    ``TV(p_i, q_k)`` for a different keypoint ``k = (i + s_i) mod n`` with ``s_i`` drawn by
    ``rng.integers(1, n, size=n)``, one draw per slice in order.

    Args:
        first, second: (B, heads, K, K) weights of the two views; valid1, valid2: (B, K) bool.

    Returns:
        (own, other), one entry per row, ordered by (slice, keypoint).
    """
    _check(first, valid1)
    _check(second, valid2, "second")
    own, other = [], []
    for b in range(first.shape[0]):
        common = torch.nonzero(valid1[b] & valid2[b]).flatten()  # (n,)
        n = len(common)
        if n < minimum:
            continue
        p = first[b].mean(0)[common][:, common]  # (n, n)
        q = second[b].mean(0)[common][:, common]
        p, q = p / p.sum(1, keepdim=True), q / q.sum(1, keepdim=True)
        partner = (torch.arange(n) + torch.from_numpy(rng.integers(1, n, size=n))) % n  # (n,), never i
        own.append(total_variation(p, q))
        other.append(total_variation(p, q[partner]))
    empty = first.new_zeros(0)
    return (torch.cat(own) if own else empty), (torch.cat(other) if other else empty)
