"""Attention statistics (kpssl.eval.attention) and the attention view (kpssl.viz.attention).

Every statistic is compared in float64 with a slow reference written as plain loops over slices,
heads and keypoints, on attention with padded keypoints and slices with fewer than two valid ones.
"""

from __future__ import annotations

import dataclasses
import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from kpssl.eval.attention import (  # noqa: E402
    attention_by_distance,
    kaf_attention,
    row_stability,
    row_statistics,
    total_variation,
)
from kpssl.models import KAFUNet  # noqa: E402
from kpssl.settings import ModelSettings  # noqa: E402
from kpssl.viz.attention import (  # noqa: E402
    attention_row,
    keypoint_attention,
    keypoint_attention_widget,
    most_peaked_query,
)

B, HEADS, K = 5, 3, 9


def random_attention(seed: int = 0, scale: float = 1.0):
    """Logits, masked softmax weights (float64) and keypoints; slice 3 has one valid keypoint, slice 4 none."""
    generator = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(B, HEADS, K, K, generator=generator, dtype=torch.float64)
    valid = torch.rand(B, K, generator=generator) < 0.7
    valid[0, :3] = True
    valid[1, :] = True
    valid[3] = False
    valid[3, 2] = True
    valid[4] = False
    keys = valid[:, None, None, :] | ~valid.any(-1)[:, None, None, None]
    weights = logits.masked_fill(~keys, float("-inf")).softmax(-1) * valid.any(-1)[:, None, None, None]
    keypoints = torch.rand(B, K, 2, generator=generator, dtype=torch.float64) * 60
    return logits, weights, valid, keypoints


# ------------------------------------------------------------------------------------ row statistics


def reference_rows(weights, logits, valid):
    entropy, predicted, spread = [], [], []
    for b in range(valid.shape[0]):
        keys = [j for j in range(valid.shape[1]) if valid[b, j]]
        n = len(keys)
        if n < 2:
            continue
        for h in range(weights.shape[1]):
            for i in keys:
                a = [float(weights[b, h, i, j]) for j in keys]
                z = [float(logits[b, h, i, j]) for j in keys]
                mean = sum(z) / n
                variance = sum((x - mean) ** 2 for x in z) / n
                entropy.append(-sum(x * math.log(x) for x in a if x > 0) / math.log(n))
                predicted.append(1 - variance / (2 * math.log(n)))
                spread.append(math.sqrt(variance))
    return [torch.tensor(x, dtype=torch.float64) for x in (entropy, predicted, spread)]


def test_row_statistics_match_the_loops():
    logits, weights, valid, _ = random_attention()
    got = row_statistics(weights, logits, valid)
    expected = reference_rows(weights, logits, valid)
    assert got.entropy.dtype == torch.float64
    for value, reference in zip((got.entropy, got.predicted, got.spread), expected):
        torch.testing.assert_close(value, reference, rtol=1e-12, atol=1e-12)
    rows = sum(HEADS * int(valid[b].sum()) for b in range(B) if valid[b].sum() >= 2)
    assert len(got.entropy) == rows


def test_uniform_attention_has_entropy_one_and_small_spread_follows_the_prediction():
    logits, weights, valid, _ = random_attention(scale=0.0)
    stats = row_statistics(weights, logits, valid)
    torch.testing.assert_close(stats.entropy, torch.ones_like(stats.entropy), rtol=0, atol=1e-12)
    assert stats.spread.abs().max() == 0
    logits, weights, valid, _ = random_attention(scale=0.05)
    stats = row_statistics(weights, logits, valid)
    assert (stats.entropy - stats.predicted).abs().max() < 1e-3  # the small-spread approximation


def test_row_statistics_without_rows_and_bad_shapes():
    logits, weights, valid, _ = random_attention()
    none = torch.zeros_like(valid)
    stats = row_statistics(weights, logits, none)
    assert stats.entropy.numel() == 0 and all(math.isnan(x) for x in stats.means())
    with pytest.raises(ValueError, match="weights must be"):
        row_statistics(weights[0], logits, valid)
    with pytest.raises(ValueError, match="valid must be bool"):
        row_statistics(weights, logits, valid.long())


# ------------------------------------------------------------------------------- attention by distance


def reference_by_distance(weights, keypoints, valid, edges):
    sums, counts = [0.0] * (len(edges) - 1), [0] * (len(edges) - 1)
    for b in range(valid.shape[0]):
        keys = [j for j in range(valid.shape[1]) if valid[b, j]]
        n = len(keys)
        if n < 2:
            continue
        for i in keys:
            for j in keys:
                if i == j:
                    continue
                distance = sum(abs(float(keypoints[b, i, c] - keypoints[b, j, c])) for c in range(2))
                bin_index = len(edges) - 2
                for e in range(len(edges) - 1):
                    if distance < edges[e + 1]:
                        bin_index = e
                        break
                mean_over_heads = sum(float(weights[b, h, i, j]) for h in range(weights.shape[1])) / weights.shape[1]
                sums[bin_index] += n * mean_over_heads
                counts[bin_index] += 1
    means = [s / c if c else 0.0 for s, c in zip(sums, counts)]
    return torch.tensor(means, dtype=torch.float64), torch.tensor(counts, dtype=torch.float64)


def test_attention_by_distance_matches_the_loops():
    _, weights, valid, keypoints = random_attention(seed=1)
    edges = [0, 8, 16, 32, 64, 1000]
    means, counts = attention_by_distance(weights, keypoints, valid, edges)
    expected_means, expected_counts = reference_by_distance(weights, keypoints, valid, edges)
    torch.testing.assert_close(counts, expected_counts, rtol=0, atol=0)
    torch.testing.assert_close(means, expected_means, rtol=1e-12, atol=1e-12)
    # distances past the last edge go to the last bin; an edge value starts its bin
    short = [0, 4, 10]
    means, counts = attention_by_distance(weights, keypoints, valid, short)
    expected_means, expected_counts = reference_by_distance(weights, keypoints, valid, short)
    torch.testing.assert_close(counts, expected_counts, rtol=0, atol=0)
    torch.testing.assert_close(means, expected_means, rtol=1e-12, atol=1e-12)


def test_uniform_attention_is_flat_against_distance():
    _, weights, valid, keypoints = random_attention(scale=0.0)
    means, counts = attention_by_distance(weights, keypoints, valid, [0, 20, 40, 200])
    filled = counts > 0
    torch.testing.assert_close(means[filled], torch.ones_like(means[filled]), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="increasing"):
        attention_by_distance(weights, keypoints, valid, [0, 10, 10])


# ---------------------------------------------------------------------------------------- stability


def reference_stability(first, second, valid1, valid2, seed):
    rng = np.random.default_rng(seed)
    own, other = [], []
    for b in range(first.shape[0]):
        common = [j for j in range(first.shape[-1]) if valid1[b, j] and valid2[b, j]]
        n = len(common)
        if n < 3:
            continue
        heads = first.shape[1]

        def row(weights, i):
            values = [sum(float(weights[b, h, i, j]) for h in range(heads)) / heads for j in common]
            total = sum(values)
            return [v / total for v in values]

        shift = rng.integers(1, n, size=n)
        for position, i in enumerate(common):
            p = row(first, i)
            q = row(second, i)
            partner = common[(position + int(shift[position])) % n]
            q_other = row(second, partner)
            own.append(0.5 * sum(abs(x - y) for x, y in zip(p, q)))
            other.append(0.5 * sum(abs(x - y) for x, y in zip(p, q_other)))
    return torch.tensor(own, dtype=torch.float64), torch.tensor(other, dtype=torch.float64)


def test_row_stability_matches_the_loops():
    _, first, valid1, _ = random_attention(seed=2)
    _, second, _, _ = random_attention(seed=3)
    valid2 = valid1.clone()
    valid2[0, 0] = False  # a keypoint pushed out of the second view
    own, other = row_stability(first, second, valid1, valid2, np.random.default_rng(7))
    expected_own, expected_other = reference_stability(first, second, valid1, valid2, 7)
    torch.testing.assert_close(own, expected_own, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(other, expected_other, rtol=1e-12, atol=1e-12)
    same, _ = row_stability(first, first, valid1, valid1, np.random.default_rng(0))
    assert same.abs().max() < 1e-12  # identical views: no change
    none, _ = row_stability(first, second, torch.zeros_like(valid1), valid2, np.random.default_rng(0))
    assert none.numel() == 0


def test_total_variation_bounds():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
    q = torch.tensor([[0.0, 0.0, 1.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(total_variation(p, q), torch.tensor([1.0, 0.0], dtype=torch.float64))


# -------------------------------------------------------------------------- reading a network


def tiny_network(levels=(True, True, True, True)) -> KAFUNet:
    settings = dataclasses.replace(ModelSettings(), width=4, descriptor_dim=16, heads=4, attention_blocks=2,
                                   fusion_hidden=8, kaf_levels=levels)
    torch.manual_seed(0)
    return KAFUNet(settings).double().eval()


@pytest.mark.parametrize("levels", [(True, True, True, True), (False, True, False, True)])
def test_kaf_attention_weights_are_the_softmax_of_the_logits(levels):
    network = tiny_network(levels)
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(2, 1, 32, 32, generator=generator, dtype=torch.float64)
    keypoints = torch.rand(2, 7, 2, generator=generator, dtype=torch.float64) * 31
    valid = torch.tensor([[True] * 5 + [False] * 2, [True, False] * 3 + [True]])
    attention = kaf_attention(network, image, keypoints, valid)
    assert attention.levels == tuple(i + 1 for i, on in enumerate(levels) if on)
    assert len(attention.weights) == len(attention.logits) == sum(levels)
    for level_weights, level_logits in zip(attention.weights, attention.logits):
        assert len(level_weights) == len(level_logits) == 2
        for w, z in zip(level_weights, level_logits):
            assert tuple(w.shape) == tuple(z.shape) == (2, 4, 7, 7)
            expected = z.double().masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1)
            torch.testing.assert_close(w.double(), expected, rtol=0, atol=1e-6)  # weights come back as float32
    with pytest.raises(ValueError, match="KAF-UNet"):
        kaf_attention(torch.nn.Linear(2, 2), image, keypoints, valid)


# ------------------------------------------------------------------------------------- the view


def test_attention_row_and_query():
    _, weights, valid, keypoints = random_attention(seed=4)
    b = 1  # every keypoint valid
    row = attention_row(weights[b], valid[b], 2)
    torch.testing.assert_close(torch.from_numpy(row), K * weights[b].mean(0)[2])
    assert abs(row.mean() - 1) < 1e-12
    head_row = attention_row(weights[b], valid[b], 2, head=1)
    torch.testing.assert_close(torch.from_numpy(head_row), K * weights[b, 1, 2])
    query = most_peaked_query(weights[0], valid[0])
    rows = weights[0].mean(0)
    best = max((j for j in range(K) if valid[0, j]), key=lambda i: max(float(rows[i, j]) for j in range(K) if valid[0, j]))
    assert query == best
    invalid = int(torch.nonzero(~valid[0]).flatten()[0])
    with pytest.raises(ValueError, match="not a valid keypoint"):
        attention_row(weights[0], valid[0], invalid)
    with pytest.raises(ValueError, match="head"):
        attention_row(weights[0], valid[0], 0, head=HEADS)
    with pytest.raises(ValueError, match="no valid keypoint"):
        most_peaked_query(weights[4], valid[4])


def test_keypoint_attention_draws_and_the_widget_builds():
    _, weights, valid, keypoints = random_attention(seed=5)
    images = torch.rand(B, 1, 60, 60)
    fig, ax = plt.subplots()
    dots = keypoint_attention(ax, images[0, 0].numpy(), keypoints[0], valid[0], weights[0], 0, title="t")
    assert len(dots.get_offsets()) == int(valid[0].sum())
    plt.close(fig)
    pytest.importorskip("ipywidgets")
    attention = {"random": [[weights, weights]], "other": [[weights, weights]]}
    widget = keypoint_attention_widget(images, keypoints, valid, attention, levels=[2])
    controls = widget.children[0].children + widget.children[1].children
    network, slice_index, keypoint, level, block, head = controls
    slice_index.value = 4  # a slice without keypoints is drawn, not refused
    slice_index.value = 1
    keypoint.value = 3
    head.value = 2
    network.value = "other"
    assert keypoint.max == int(valid[1].sum()) - 1
    plt.close("all")
    with pytest.raises(ValueError, match="levels given"):
        keypoint_attention_widget(images, keypoints, valid, attention, levels=[1, 2])
