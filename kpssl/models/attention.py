"""Attention among keypoints with padding: masked BatchNorm, position encoder, attention blocks.

Shared by the KAF layer (the KAF layer's position and attention steps) and the matching head (the paper's Eqs. 1-3). Keypoint
features are kept channels-last, (B, K, C), beside a validity mask ``valid`` (B, K) bool. Padded
(invalid) keypoints never change a valid keypoint's output:

* BatchNorm statistics are taken over valid keypoints only (:func:`masked_batch_norm`);
* attention never attends to a padded key (:func:`masked_attention`); an image with no valid key at all
  receives a zero message instead of a NaN.

The blocks follow SuperGlue (Sarlin et al., CVPR 2020), as the KAF authors do:
x <- x + MLP([x || MHA(x, s, s)]) with the MLP 2d -> 2d -> d, BatchNorm + ReLU inside, no LayerNorm.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "KeypointMask",
    "keypoint_mask",
    "masked_batch_norm",
    "MaskedBatchNorm1d",
    "normalize_keypoints",
    "KeypointPositionEncoder",
    "masked_attention",
    "AttentionBlock",
]


class KeypointMask(NamedTuple):
    """A validity mask (B, K) with what masked BatchNorm and attention derive from it, computed once.

    The KAF layer runs 2 T + 4 masked BatchNorms and T attentions under one mask; deriving these here
    once saves many small operations (kernel launches on a GPU).
    """

    valid: Tensor  # (B, K) bool
    weights: Tensor  # (B K,) valid / count: the averaging weights of the BatchNorm statistics
    count: Tensor  # () number of valid keypoints in the batch
    attend: Tensor  # (B, 1, 1, K) bool: keys that may be attended to (all keys of an image without valid ones)
    keep: Tensor  # (B, 1, 1, 1): 0 for an image without valid keys, whose messages are zeroed


def keypoint_mask(valid: Tensor | KeypointMask, dtype: torch.dtype = torch.float32) -> KeypointMask:
    """Derive a :class:`KeypointMask` from valid (B, K) bool (a mask is returned as it is)."""
    if isinstance(valid, KeypointMask):
        return valid
    if valid.dtype != torch.bool or valid.ndim != 2:
        raise ValueError(f"expected a bool validity mask (B, K), got {valid.dtype} {tuple(valid.shape)}")
    flat = valid.reshape(-1).to(dtype)  # (B K,)
    count = flat.sum()
    has_keys = valid.any(dim=-1, keepdim=True)  # (B, 1)
    # An all-invalid row would softmax over nothing (NaN): let it attend everywhere, then zero it.
    attend = (valid | ~has_keys)[:, None, None, :]  # (B, 1, 1, K)
    return KeypointMask(valid, flat / count.clamp_min(1.0), count, attend, has_keys.to(dtype)[:, :, None, None])


def masked_batch_norm(x: Tensor, valid: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                      weight: Tensor | None, bias: Tensor | None, training: bool, momentum: float,
                      eps: float) -> Tensor:
    """BatchNorm over keypoint features whose statistics ignore padded keypoints.

    Args:
        x: (B, K, C) features; valid: (B, K) bool.
        running_mean, running_var: (C,) buffers, updated in place when ``training`` (with the unbiased
            variance, like ``torch.nn.BatchNorm1d``); ``None`` to always use batch statistics.
        training: use batch statistics over the valid entries; when no entry is valid the running
            statistics are used and not updated (without running statistics: mean 0, variance 1).

    Returns:
        (B, K, C). Outputs at padded positions are computed with the same statistics and are meaningless.
    """
    if training or running_mean is None:
        m = valid.unsqueeze(-1).to(x.dtype)  # (B, K, 1)
        count = m.sum()
        denominator = count.clamp_min(1.0)
        mean = (x * m).sum(dim=(0, 1)) / denominator  # (C,)
        var = ((x - mean) * m).square().sum(dim=(0, 1)) / denominator  # (C,), biased, as used to normalise
        has_valid = count > 0
        if running_mean is not None and running_var is not None:
            if training:
                with torch.no_grad():
                    unbiased = var * count / (count - 1.0).clamp_min(1.0)
                    running_mean.copy_(torch.where(has_valid, torch.lerp(running_mean, mean, momentum), running_mean))
                    running_var.copy_(torch.where(has_valid, torch.lerp(running_var, unbiased, momentum), running_var))
            mean = torch.where(has_valid, mean, running_mean)
            var = torch.where(has_valid, var, running_var)
        else:
            var = torch.where(has_valid, var, torch.ones_like(var))
    else:
        mean, var = running_mean, running_var
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    y = (x - mean) * scale  # (B, K, C)
    return y + bias if bias is not None else y


class _MaskedBatchNormFunction(torch.autograd.Function):
    """Training-mode masked BatchNorm on (N, C) rows with a hand-written backward (few, large ops).

    ``weights`` (N,) is valid / count (all zero when no row is valid, in which case ``fallback_mean``
    and ``fallback_var`` are used as fixed statistics). Every row is normalised; only rows with weight
    contribute to the statistics. With xhat = (x - mean) invstd, y = gamma xhat + beta, the backward is
    dx = invstd (dxhat - w (sum dxhat + xhat sum(dxhat xhat))), sums over all rows.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weights: Tensor, has_valid: Tensor, fallback_mean: Tensor, fallback_var: Tensor,
                gamma: Tensor, beta: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        mean = torch.where(has_valid, weights @ x, fallback_mean)  # (C,)
        centred = x - mean  # (N, C)
        var = torch.where(has_valid, weights @ centred.square(), fallback_var)  # (C,), biased
        invstd = torch.rsqrt(var + eps)
        xhat = centred.mul_(invstd)  # (N, C)
        ctx.save_for_backward(xhat, weights, gamma, invstd)
        ctx.mark_non_differentiable(mean, var)
        return torch.addcmul(beta, xhat, gamma), mean, var

    @staticmethod
    def backward(ctx, grad_y: Tensor, _grad_mean: Tensor, _grad_var: Tensor):  # type: ignore[override]
        xhat, weights, gamma, invstd = ctx.saved_tensors
        grad_beta = grad_y.sum(dim=0)  # (C,)
        grad_gamma = (grad_y * xhat).sum(dim=0)  # (C,)
        grad_x = None
        if ctx.needs_input_grad[0]:
            statistics = torch.addcmul(grad_beta * gamma, xhat, grad_gamma * gamma)  # (N, C)
            grad_x = (grad_y * gamma - weights.unsqueeze(1) * statistics) * invstd
        return grad_x, None, None, None, None, grad_gamma, grad_beta, None


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` over (B, K, C) keypoint features with a validity mask (B, K).

    Same parameters and buffers (and state-dict names) as ``BatchNorm1d``; the statistics of a training
    step are taken over the valid keypoints only, so padding never changes a valid output. The training
    step runs a fused autograd function equal to :func:`masked_batch_norm` (the readable reference).
    ``valid`` may be a bool (B, K) tensor or a precomputed :class:`KeypointMask`.
    """

    def forward(self, x: Tensor, valid: Tensor | KeypointMask) -> Tensor:  # type: ignore[override]
        if x.ndim != 3 or x.shape[-1] != self.num_features:
            raise ValueError(f"expected (B, K, {self.num_features}) features, got {tuple(x.shape)}")
        momentum = self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average, as BatchNorm1d
                momentum = 1.0 / float(self.num_batches_tracked)
        momentum = 0.0 if momentum is None else momentum
        use_batch = self.training or not self.track_running_stats
        if not use_batch:  # evaluation: the running statistics, one fused op
            return F.batch_norm(x.reshape(-1, x.shape[-1]), self.running_mean, self.running_var, self.weight,
                                self.bias, False, 0.0, self.eps).view(x.shape)
        mask = keypoint_mask(valid, x.dtype if self.weight is None else self.weight.dtype)
        if self.weight is None or self.bias is None:
            return masked_batch_norm(x, mask.valid, self.running_mean, self.running_var, self.weight, self.bias,
                                     True, momentum, self.eps)
        running = self.running_mean is not None and self.running_var is not None
        fallback_mean = self.running_mean if running else self.weight.new_zeros(self.num_features)
        fallback_var = self.running_var if running else self.weight.new_ones(self.num_features)
        with torch.autocast(x.device.type, enabled=False):  # statistics in the parameters' precision
            y, mean, var = _MaskedBatchNormFunction.apply(
                x.reshape(-1, x.shape[-1]).to(self.weight.dtype), mask.weights.to(self.weight.dtype),
                mask.count > 0, fallback_mean, fallback_var, self.weight, self.bias, self.eps)
        if running and self.training:
            with torch.no_grad():  # without valid entries mean, var are the running values: no change
                bessel = torch.where(mask.count > 1, mask.count / (mask.count - 1.0), 1.0)
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(var * bessel, momentum)
        return y.view(x.shape).to(x.dtype)  # (B, K, C)


def normalize_keypoints(keypoints: Tensor, image_size: tuple[int, int]) -> Tensor:
    """(p - size / 2) / (0.7 * max(H, W)) for keypoints (B, K, 2) as (row, col) in an H x W image."""
    height, width = image_size
    size = keypoints.new_tensor([height, width])  # (2,) in (row, col) order
    return (keypoints - size / 2) / (0.7 * max(height, width))


class KeypointPositionEncoder(nn.Module):
    """Position MLP 2 -> 32 -> 64 -> 128 -> 256 -> d (masked BatchNorm + ReLU between layers).

    ``forward(normalized (B, K, 2), valid (B, K) or KeypointMask) -> (B, K, d)``; the last bias starts
    at 0.
    """

    def __init__(self, dim: int, hidden: tuple[int, ...] = (32, 64, 128, 256)) -> None:
        super().__init__()
        sizes = [2, *hidden, dim]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.norms = nn.ModuleList(MaskedBatchNorm1d(b) for b in sizes[1:-1])
        nn.init.zeros_(self.linears[-1].bias)

    def forward(self, normalized: Tensor, valid: Tensor | KeypointMask) -> Tensor:
        mask = keypoint_mask(valid, self.linears[0].weight.dtype)
        x = normalized
        for linear, norm in zip(self.linears[:-1], self.norms):
            x = F.relu(norm(linear(x), mask))
        return self.linears[-1](x)  # (B, K, d)


def masked_attention(query: Tensor, key: Tensor, value: Tensor, key_valid: Tensor | KeypointMask,
                     need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
    """Scaled dot-product attention that ignores padded keys.

    Args:
        query: (B, h, Kq, e); key, value: (B, h, Kk, e); key_valid: (B, Kk) bool or a KeypointMask.
        need_weights: also return the attention weights, computed explicitly (slower).

    Returns:
        messages (B, h, Kq, e) = softmax(q k^T / sqrt(e) over valid keys) v, and the weights
        (B, h, Kq, Kk) or ``None``. An image with no valid key gets zero messages and zero weights.
    """
    batch, heads, queries, e = query.shape
    if key.shape[-2] == 0:
        weights = query.new_zeros(batch, heads, queries, 0) if need_weights else None
        return query.new_zeros(batch, heads, queries, value.shape[-1]), weights
    mask = keypoint_mask(key_valid)
    keep = mask.keep.to(query.dtype)  # (B, 1, 1, 1)
    if not need_weights:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask.attend) * keep, None
    scores = query @ key.transpose(-1, -2) / math.sqrt(e)  # (B, h, Kq, Kk)
    weights = scores.masked_fill(~mask.attend, float("-inf")).softmax(dim=-1) * keep
    return weights @ value, weights  # (B, h, Kq, e)


class AttentionBlock(nn.Module):
    """One attentional propagation step: x <- x + MLP([x || MHA(x, s, s)]) (the KAF layer's attention step).

    Self-attention when ``source`` is omitted (s = x), cross-attention otherwise. Projections q, k, v are
    one ``Linear(d, 3d)`` (split for cross-attention), the merge is ``Linear(d, d)``, the MLP is
    2d -> 2d -> d with masked BatchNorm + ReLU; its last bias starts at 0.

    ``forward(x (B, K, d), valid (B, K), source (B, S, d) | None, source_valid (B, S) | None,
    need_weights) -> (x' (B, K, d), weights (B, heads, K, S) | None)``; masks may be precomputed
    :class:`KeypointMask` objects.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"descriptor dimension {dim} is not divisible by {heads} heads")
        self.dim, self.heads = dim, heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.merge = nn.Linear(dim, dim)
        self.mlp_in = nn.Linear(2 * dim, 2 * dim)
        self.mlp_norm = MaskedBatchNorm1d(2 * dim)
        self.mlp_out = nn.Linear(2 * dim, dim)
        nn.init.zeros_(self.mlp_out.bias)

    def _split_heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, self.dim // self.heads).transpose(1, 2)  # (B, h, K, e)

    def scores(self, x: Tensor, source: Tensor | None = None) -> Tensor:
        """The attention logits z = q k^T / sqrt(e) per head, before masking and softmax.

        x (B, K, d), source (B, S, d) or ``None`` for self-attention -> (B, heads, K, S). With the
        validity mask applied, ``softmax`` over the last axis gives the weights ``forward`` uses.
        """
        d = self.dim
        source = x if source is None else source
        q = F.linear(x, self.qkv.weight[:d], self.qkv.bias[:d])  # (B, K, d)
        k = F.linear(source, self.qkv.weight[d:2 * d], self.qkv.bias[d:2 * d])  # (B, S, d)
        q, k = self._split_heads(q), self._split_heads(k)  # (B, h, K, e), (B, h, S, e)
        return q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)

    def forward(self, x: Tensor, valid: Tensor | KeypointMask, source: Tensor | None = None,
                source_valid: Tensor | KeypointMask | None = None,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        d = self.dim
        valid = keypoint_mask(valid, self.qkv.weight.dtype)
        if source is None:
            q, k, v = self.qkv(x).split(d, dim=-1)  # 3 x (B, K, d)
            source_valid = valid
        else:
            if source_valid is None:
                raise ValueError("cross-attention needs source_valid")
            source_valid = keypoint_mask(source_valid, self.qkv.weight.dtype)
            q = F.linear(x, self.qkv.weight[:d], self.qkv.bias[:d])  # (B, K, d)
            k, v = F.linear(source, self.qkv.weight[d:], self.qkv.bias[d:]).split(d, dim=-1)  # (B, S, d)
        message, weights = masked_attention(self._split_heads(q), self._split_heads(k), self._split_heads(v),
                                            source_valid, need_weights)  # (B, h, K, e)
        message = self.merge(message.transpose(1, 2).reshape(x.shape))  # (B, K, d)
        hidden = F.relu(self.mlp_norm(self.mlp_in(torch.cat([x, message], dim=-1)), valid))  # (B, K, 2d)
        return x + self.mlp_out(hidden), weights
