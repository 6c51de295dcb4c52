"""Tests of kpssl.models: shapes, masking, padding, sparse fusion, parameter counts (CPU, seconds)."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from kpssl.models import (
    AttentionBlock,
    BottleneckProjection,
    KAFLayer,
    Encoding,
    KAFUNet,
    KeypointFusion,
    KeypointGlobalHead,
    MaskedBatchNorm1d,
    MatchingHead,
    UNet,
    collision_counts,
    count_parameters,
    densify,
    format_parameter_summary,
    level_pixels,
    masked_attention,
    masked_batch_norm,
    masked_mean,
    matching_scores,
    merge_duplicate_pixels,
    parameter_summary,
    sample_bilinear,
    sample_nearest,
    scatter_average,
    sparse_batch_norm_relu,
    sparse_conv3x3,
    sparse_conv3x3_dense,
    spread_keypoints,
)
from kpssl.settings import PRESETS, ModelSettings, preset

SIZE = 32


def small(settings: ModelSettings, **changes) -> ModelSettings:
    """A preset's model settings scaled down to run in milliseconds."""
    values = dict(width=4, descriptor_dim=16, heads=4, attention_blocks=2, fusion_hidden=8, matching_blocks=2,
                  projection_dim=8)
    values.update(changes)
    return dataclasses.replace(settings, **values)


def random_keypoints(batch: int, count: int, size: int = SIZE, seed: int = 0, fraction_valid: float = 0.7):
    generator = torch.Generator().manual_seed(seed)
    keypoints = torch.rand(batch, count, 2, generator=generator) * (size - 1)
    valid = torch.rand(batch, count, generator=generator) < fraction_valid
    valid[:, 0] = True
    keypoints[~valid] = 0.0
    return keypoints, valid


def with_garbage_padding(keypoints, valid, extra: int):
    """Append ``extra`` padded keypoints with nonsense coordinates (NaN, huge, negative)."""
    batch = keypoints.shape[0]
    garbage = torch.tensor([[float("nan"), 3.0], [1e9, -1e9], [-50.0, 7.5], [SIZE + 100.0, float("inf")]])
    garbage = garbage.repeat(extra // 4 + 1, 1)[:extra].expand(batch, -1, -1)
    padded = torch.cat([keypoints, garbage], dim=1)
    padded_valid = torch.cat([valid, torch.zeros(batch, extra, dtype=torch.bool)], dim=1)
    return padded, padded_valid


# ----------------------------------------------------------------------------------------------- UNet


def test_unet_shapes_and_encode():
    net = UNet(1, 3, 4)
    encoding = net.encode(torch.randn(2, 1, SIZE, SIZE))
    skips, bottleneck = encoding.skips, encoding.bottleneck
    assert [tuple(s.shape) for s in skips] == [(2, 4, 32, 32), (2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4)]
    assert bottleneck.shape == (2, 64, 2, 2)
    assert net.decode(skips, bottleneck).shape == (2, 3, SIZE, SIZE)


@pytest.mark.parametrize("need_weights", [False, True])
def test_both_networks_encode_to_the_same_interface(need_weights):
    """UNet and KAF-UNet are called alike (image, keypoints, valid) and both return an :class:`Encoding`
    whose skips and bottleneck their decoder takes; the UNet has no keypoint features and no KAF levels."""
    settings = small(ModelSettings(), classes=3)
    image = torch.randn(2, 1, SIZE, SIZE)
    keypoints, valid = random_keypoints(2, 5)
    torch.manual_seed(0)
    networks = {"unet": UNet(1, 3, settings.width), "kaf": KAFUNet(settings)}
    encodings = {name: net.encode(image, keypoints, valid, need_weights=need_weights)
                 for name, net in networks.items()}
    for name, net in networks.items():
        encoding = encodings[name]
        assert type(encoding) is Encoding
        assert len(encoding.skips) == 4 and encoding.bottleneck.shape[:2] == (2, net.bottleneck_channels)
        assert len(encoding.keypoint_features) == len(encoding.levels)
        assert (encoding.attention is not None) == need_weights
        logits = net.decode(encoding.skips, encoding.bottleneck)
        torch.testing.assert_close(logits, net(image, keypoints, valid))  # forward = decode(encode(...))
    assert encodings["unet"].levels == () and encodings["unet"].keypoint_features == []
    assert encodings["kaf"].levels == (1, 2, 3, 4)
    assert [tuple(f.shape) for f in encodings["kaf"].keypoint_features] == [(2, 5, 16)] * 4
    unet = networks["unet"]
    torch.testing.assert_close(unet(image, keypoints, valid), unet(image))  # the UNet ignores the keypoints
    with pytest.raises(ValueError, match="bool valid"):
        unet.encode(image, keypoints, valid.float())  # but checks them, as the KAF-UNet does
    with pytest.raises(ValueError, match="together"):
        unet.encode(image, keypoints)


def test_unet_rejects_bad_inputs():
    with pytest.raises(ValueError, match="divisible by 16"):
        UNet(1, 2, 4)(torch.randn(1, 1, 30, 32))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        UNet(1, 2, 4)(torch.randn(1, 2, 32, 32))
    with pytest.raises(ValueError, match="width"):
        UNet(1, 2, 0)


@pytest.mark.parametrize("width, classes, expected, paper", [(48, 4, 17_462_016, 17.5e6), (32, 8, 7_763_584, 7.8e6)])
def test_unet_parameter_counts(width, classes, expected, paper):
    with torch.device("meta"):
        count = count_parameters(UNet(1, classes, width))
    assert count == expected
    assert abs(count - paper) / paper < 0.005


# ----------------------------------------------------------------------------------------------- KAF-UNet


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_kaf_unet_shapes_for_every_preset(name):
    settings = small(preset(name).model)
    model = KAFUNet(settings)
    image = torch.randn(2, 1, SIZE, SIZE)
    keypoints, valid = random_keypoints(2, 6)
    encoding = model.encode(image, keypoints, valid)
    assert encoding.levels == (1, 2, 3, 4)
    assert [tuple(f.shape) for f in encoding.keypoint_features] == [(2, 6, 16)] * 4
    assert [s.shape[1] for s in encoding.skips] == [8, 16, 32, 64]  # doubled at every KAF level
    assert encoding.bottleneck.shape == (2, model.bottleneck_channels, 2, 2)
    assert model(image, keypoints, valid).shape == (2, settings.classes, SIZE, SIZE)
    attention = model.encode(image, keypoints.double(), valid, need_weights=True).attention
    assert [[tuple(w.shape) for w in level] for level in attention] == [[(2, 4, 6, 6)] * 2] * 4


@pytest.mark.parametrize("decoder", ["doubled", "plain"])
@pytest.mark.parametrize("levels", [(True, False, True, False), (False, True, True, True)])
def test_kaf_unet_partial_levels(levels, decoder):
    model = KAFUNet(small(ModelSettings(), kaf_levels=levels, kaf_decoder=decoder, classes=3))
    keypoints, valid = random_keypoints(2, 5)
    encoding = model.encode(torch.randn(2, 1, SIZE, SIZE), keypoints, valid)
    assert encoding.levels == tuple(i + 1 for i, on in enumerate(levels) if on)
    assert len(encoding.keypoint_features) == sum(levels)
    assert model.decode(encoding.skips, encoding.bottleneck).shape == (2, 3, SIZE, SIZE)


def test_kaf_unet_without_kaf_levels_is_the_unet():
    settings = small(ModelSettings(), kaf_levels=(False,) * 4, classes=3)
    model, unet = KAFUNet(settings).double(), UNet(1, 3, settings.width).double()
    model.load_state_dict(unet.state_dict())  # same names, same shapes
    model.eval(), unet.eval()
    image = torch.randn(2, 1, SIZE, SIZE, dtype=torch.float64)
    keypoints, valid = random_keypoints(2, 4)
    torch.testing.assert_close(model(image, keypoints, valid), unet(image))


def test_kaf_unet_rejects_bad_settings_and_inputs():
    with pytest.raises(ValueError, match="divisible"):
        KAFUNet(small(ModelSettings(), descriptor_dim=18))
    with pytest.raises(ValueError, match="kaf_decoder"):
        KAFUNet(small(ModelSettings(), kaf_decoder="wide"))
    with pytest.raises(ValueError, match="sampling"):
        KAFUNet(small(ModelSettings(), sampling="cubic"))
    with pytest.raises(ValueError, match="kaf_levels"):
        KAFUNet(small(ModelSettings(), kaf_levels=(True, True)))
    model = KAFUNet(small(ModelSettings()))
    keypoints, valid = random_keypoints(2, 4)
    image = torch.randn(2, 1, SIZE, SIZE)
    with pytest.raises(ValueError, match="bool valid"):
        model(image, keypoints, valid.float())
    with pytest.raises(ValueError, match="float keypoints"):
        model(image, keypoints.long(), valid)
    with pytest.raises(ValueError, match="for 2 images"):
        model(image, keypoints[:1], valid[:1])


@pytest.mark.parametrize("settings, expected, paper", [
    (ModelSettings(), 106_546_624, 106.8e6),
    (ModelSettings(width=32, classes=8), 71_467_264, 71.7e6),
])
def test_kaf_unet_parameter_counts_match_the_paper(settings, expected, paper):
    summary = parameter_summary(settings)
    assert summary["segmentation"] == expected
    assert abs(expected - paper) / paper < 0.01
    # the remainder is the authors' unused final projection and dustbin score, one per KAF layer
    d = settings.descriptor_dim
    assert abs(expected + 4 * (d * d + d + 1) - paper) / paper < 0.0005
    parts = ["encoder", "kaf", "bottleneck", "decoder"]
    assert sum(summary[p] for p in parts) == summary["segmentation"]
    assert summary["kaf"] == sum(summary[f"kaf_level_{l}"] for l in range(1, 5))
    text = format_parameter_summary(summary, "paper")
    assert "segmentation" in text and f"{expected:,}" in text


def test_parameter_summary_matches_built_modules():
    settings = small(preset("tiny").model)
    summary = parameter_summary(settings)
    assert summary["segmentation"] == count_parameters(KAFUNet(settings))
    assert summary["plain_unet"] == count_parameters(UNet(1, settings.classes, settings.width))
    assert summary["matching_head"] == count_parameters(MatchingHead.from_settings(settings))


# ----------------------------------------------------------------------------------------------- pieces


def test_level_pixels_follow_pixel_centres():
    keypoints = torch.tensor([[[0.0, 0.0], [3.0, 5.0], [3.49, 3.5], [-0.4, 30.6], [15.0, 14.0]]])
    rows, cols = level_pixels(keypoints, 1, 32, 32)
    assert rows.tolist() == [[0, 3, 3, 0, 15]] and cols.tolist() == [[0, 5, 4, 31, 14]]
    rows, cols = level_pixels(keypoints, 4, 8, 8)
    # integer keypoints: the authors' integer division p // s
    assert rows[0, [0, 1, 4]].tolist() == [0, 0, 3] and cols[0, [0, 1, 4]].tolist() == [0, 1, 3]
    rows, cols = level_pixels(torch.tensor([[[100.0, -100.0]]]), 2, 16, 16)
    assert (rows.item(), cols.item()) == (15, 0)  # clamped into the map


def test_bilinear_sampling_hits_level_pixel_centres():
    features = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    rows = torch.tensor([[0, 3, 7], [5, 5, 2]])
    cols = torch.tensor([[0, 6, 7], [1, 4, 2]])
    nearest = sample_nearest(features, rows, cols)
    for stride in (1, 2, 4):
        centres = torch.stack([rows, cols], -1).double() * stride + (stride - 1) / 2
        torch.testing.assert_close(sample_bilinear(features, centres, stride), nearest)
    halfway = torch.tensor([[[0.0, 0.5]]], dtype=torch.float64)  # between pixels (0, 0) and (0, 1) at stride 1
    expected = (features[:1, :, 0, 0] + features[:1, :, 0, 1]) / 2
    torch.testing.assert_close(sample_bilinear(features[:1], halfway, 1)[:, 0], expected)


def test_masked_batch_norm_uses_valid_entries_only():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 5, dtype=torch.float64)
    valid = torch.rand(3, 7) < 0.6
    x_garbage = torch.where(valid.unsqueeze(-1), x, 1e4)
    reference = torch.nn.BatchNorm1d(5).double()
    masked = MaskedBatchNorm1d(5).double()
    with torch.no_grad():
        reference.weight.uniform_(), reference.bias.uniform_()
    masked.load_state_dict(reference.state_dict())
    out = masked(x_garbage, valid)
    torch.testing.assert_close(out[valid], reference(x[valid]))
    torch.testing.assert_close(masked.running_mean, reference.running_mean)
    torch.testing.assert_close(masked.running_var, reference.running_var)
    masked.eval(), reference.eval()
    torch.testing.assert_close(masked(x, valid)[valid], reference(x[valid]))


@pytest.mark.parametrize("any_valid", [True, False])
def test_masked_batch_norm_fast_path_matches_the_reference(any_valid):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    valid = torch.rand(3, 5) < 0.6
    valid[0, 0] = any_valid
    valid &= any_valid
    norm = MaskedBatchNorm1d(4).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(), norm.running_var.uniform_(0.5, 2.0)
    upstream = torch.randn(3, 5, 4, dtype=torch.float64)  # nonzero at padded rows too
    reference = masked_batch_norm(x, valid, norm.running_mean.clone(), norm.running_var.clone(), norm.weight,
                                  norm.bias, True, 0.1, norm.eps)
    grads_reference = torch.autograd.grad((reference * upstream).sum(), [x, norm.weight, norm.bias])
    fast = norm(x, valid)
    grads_fast = torch.autograd.grad((fast * upstream).sum(), [x, norm.weight, norm.bias])
    torch.testing.assert_close(fast, reference)
    for a, b in zip(grads_fast, grads_reference):
        torch.testing.assert_close(a, b)


def test_masked_batch_norm_without_valid_entries_keeps_running_stats():
    norm = MaskedBatchNorm1d(4)
    out = norm(torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool))
    assert torch.isfinite(out).all()
    assert torch.equal(norm.running_mean, torch.zeros(4)) and torch.equal(norm.running_var, torch.ones(4))
    out = masked_batch_norm(torch.randn(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool), None, None, None, None,
                            True, 0.1, 1e-5)
    assert out.shape == (2, 0, 4)


def test_masked_attention_equals_attention_over_valid_keys_only():
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, n, 8, dtype=torch.float64) for n in (6, 9, 9))
    key_valid = torch.rand(3, 9) < 0.6
    key_valid[0] = False  # an image without valid keys: zero messages, no NaN
    key_valid[1, 0] = True
    out, _ = masked_attention(q, k, v, key_valid)
    explicit, weights = masked_attention(q, k, v, key_valid, need_weights=True)
    torch.testing.assert_close(out, explicit)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(weights[0], torch.zeros_like(weights[0]))
    for b in (1, 2):
        keep = key_valid[b]
        expected = F.scaled_dot_product_attention(q[b], k[b][:, keep], v[b][:, keep])
        torch.testing.assert_close(out[b], expected)
        torch.testing.assert_close(weights[b].sum(-1), torch.ones(2, 6, dtype=torch.float64))
        assert torch.equal(weights[b][..., ~keep], torch.zeros_like(weights[b][..., ~keep]))


def test_attention_block_ignores_padding_and_returns_weights():
    torch.manual_seed(0)
    block = AttentionBlock(16, 4).double()
    x, valid = torch.randn(2, 5, 16, dtype=torch.float64), torch.ones(2, 5, dtype=torch.bool)
    out, weights = block(x, valid, need_weights=True)
    assert weights.shape == (2, 4, 5, 5)
    padded_x = torch.cat([x, 1e3 * torch.randn(2, 3, 16, dtype=torch.float64)], dim=1)
    padded_valid = torch.cat([valid, torch.zeros(2, 3, dtype=torch.bool)], dim=1)
    padded_out, _ = block(padded_x, padded_valid)
    torch.testing.assert_close(padded_out[:, :5], out)


# ----------------------------------------------------------------------------------------------- fusion


def fusion_keypoints():
    """Keypoints on an 8 x 8 level-3 map (32 x 32 image, stride 4) at corners, borders and colliding."""
    keypoints = torch.tensor([
        [[0.0, 0.0], [31.0, 31.0], [0.0, 31.0], [31.0, 0.0], [13.0, 17.0], [12.2, 16.4], [14.9, 18.0],
         [5.0, 30.0], [20.0, 1.0], [8.0, 8.0]],
        [[16.0, 16.0], [16.0, 16.0], [17.0, 16.0], [3.0, 3.0], [0.0, 15.0], [31.0, 15.0], [9.0, 9.0],
         [9.0, 9.0], [2.0, 29.0], [30.0, 30.0]],
    ])
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[0, 9] = valid[1, 7] = False  # an invalid keypoint colliding with a valid one must not count
    return keypoints, valid


def test_collisions_are_averaged():
    torch.manual_seed(0)
    keypoints, valid = fusion_keypoints()
    vectors = torch.randn(2, 10, 5, dtype=torch.float64)
    rows, cols = level_pixels(keypoints, 4, 8, 8)
    dense = scatter_average(vectors, rows, cols, valid, 8, 8)
    expected = torch.zeros(2, 5, 8, 8, dtype=torch.float64)
    for b in range(2):  # slow, obvious reference
        for r in range(8):
            for c in range(8):
                members = [k for k in range(10) if valid[b, k] and rows[b, k] == r and cols[b, k] == c]
                if members:
                    expected[b, :, r, c] = vectors[b, members].mean(0)
    torch.testing.assert_close(dense, expected)
    assert collision_counts(rows, cols, valid)[1, :3].tolist() == [3.0] * 3  # (16, 16) twice and (17, 16)
    assert collision_counts(rows, cols, valid)[1, 6].item() == 1.0  # partner (9, 9) is invalid


@pytest.mark.parametrize("stride, size", [(1, 32), (4, 8), (8, 4)])
def test_sparse_fusion_equals_dense_fusion_forward_and_gradients(stride, size):
    torch.manual_seed(stride)
    keypoints, valid = fusion_keypoints()
    rows, cols = level_pixels(keypoints, stride, size, size)
    vectors = torch.randn(2, 10, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    sparse = sparse_conv3x3(vectors, rows, cols, valid, weight, bias, size, size)
    dense = F.conv2d(scatter_average(vectors, rows, cols, valid, size, size), weight, bias, padding=1)
    torch.testing.assert_close(sparse, dense)
    upstream = torch.randn_like(dense)
    grads_sparse = torch.autograd.grad((sparse * upstream).sum(), [vectors, weight, bias])
    grads_dense = torch.autograd.grad((dense * upstream).sum(), [vectors, weight, bias])
    for g_sparse, g_dense in zip(grads_sparse, grads_dense):
        torch.testing.assert_close(g_sparse, g_dense)
    assert grads_sparse[0][~valid].abs().max() == 0


@pytest.mark.parametrize("size", [16, 4])  # 16: every step sparse; 4: taps cover the map, dense after step 1
def test_fusion_module_sparse_equals_dense(size):
    torch.manual_seed(0)
    keypoints, valid = fusion_keypoints()
    fusion = KeypointFusion(6, 5, 7, sparse=True).double()
    with torch.no_grad():
        fusion.norm.weight.uniform_(0.5, 1.5), fusion.norm.bias.uniform_(-0.5, 0.5)
    reference = copy.deepcopy(fusion)
    reference.sparse = False
    rows, cols = level_pixels(keypoints, 32 // size, size, size)
    vectors = torch.randn(2, 10, 6, dtype=torch.float64)
    out_sparse = fusion(vectors, rows, cols, valid, size, size)
    out_dense = reference(vectors, rows, cols, valid, size, size)
    torch.testing.assert_close(out_sparse, out_dense)
    out_sparse.square().sum().backward(), out_dense.square().sum().backward()
    # (spread.bias has a gradient of exactly zero in exact arithmetic: training-mode BatchNorm cancels it)
    scale = max(q.grad.abs().max().item() for q in reference.parameters())
    for (name, p), q in zip(fusion.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-10 * scale, rtol=1e-8, msg=name)
    for (name, a), b in zip(fusion.named_buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, msg=name)
    fusion.eval(), reference.eval()
    torch.testing.assert_close(fusion(vectors, rows, cols, valid, size, size),
                               reference(vectors, rows, cols, valid, size, size))


def test_sparse_map_steps_equal_their_dense_counterparts():
    torch.manual_seed(0)
    keypoints, valid = fusion_keypoints()
    rows, cols = level_pixels(keypoints, 2, 16, 16)
    vectors = torch.randn(2, 10, 6, dtype=torch.float64)
    conv1 = torch.randn(5, 6, 3, 3, dtype=torch.float64)
    bias1 = torch.randn(5, dtype=torch.float64)
    spread = spread_keypoints(vectors, rows, cols, valid, conv1, bias1, 16, 16)
    dense = F.conv2d(scatter_average(vectors, rows, cols, valid, 16, 16), conv1, bias1, padding=1)
    torch.testing.assert_close(densify(spread), dense)
    # listed pixels are unique per image once merged (duplicates carry zeros)
    for b in range(2):
        listed = {(r, c) for r, c, value in zip(spread.rows[b].tolist(), spread.cols[b].tolist(), spread.values[b])
                  if value.abs().sum() > 0}
        assert len(listed) == int((spread.values[b].abs().sum(-1) > 0).sum())
    gamma, beta = torch.rand(5, dtype=torch.float64) + 0.5, torch.randn(5, dtype=torch.float64)
    for training in (True, False):
        mean, var = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
        sparse_mean, sparse_var = mean.clone(), var.clone()
        activated = sparse_batch_norm_relu(spread, gamma, beta, sparse_mean, sparse_var, training, 0.1, 1e-5)
        expected = F.relu(F.batch_norm(dense, mean, var, gamma, beta, training, 0.1, 1e-5))
        torch.testing.assert_close(densify(activated), expected)
        torch.testing.assert_close(sparse_mean, mean), torch.testing.assert_close(sparse_var, var)
    conv2 = torch.randn(7, 5, 3, 3, dtype=torch.float64)
    bias2 = torch.randn(7, dtype=torch.float64)
    torch.testing.assert_close(sparse_conv3x3_dense(activated, conv2, bias2),
                               F.conv2d(densify(activated), conv2, bias2, padding=1))


def test_merge_duplicate_pixels_sums_into_one_entry():
    values = torch.arange(12.0).view(1, 6, 2)
    rows = torch.tensor([[0, 1, 0, 2, 1, 0]])
    cols = torch.tensor([[0, 1, 0, 2, 1, 0]])
    merged = merge_duplicate_pixels(values, rows, cols, 3, 3)
    assert merged[0, 5].tolist() == [0.0 + 4 + 10, 1.0 + 5 + 11]  # pixel (0, 0): entries 0, 2, 5
    assert merged[0, 4].tolist() == [2.0 + 8, 3.0 + 9]  # pixel (1, 1): entries 1, 4
    assert merged[0, 3].tolist() == [6.0, 7.0]
    assert merged[0, [0, 1, 2]].abs().sum() == 0


def test_kaf_unet_sparse_equals_dense():
    """Whole network, training mode, float64 (in float32 the dense reference's own BatchNorm rounding
    dominates the difference: its variance over mostly-zero maps is the less accurate of the two)."""
    torch.manual_seed(0)
    model = KAFUNet(small(ModelSettings())).double()
    reference = copy.deepcopy(model)
    reference.set_sparse_fusion(False)
    image = torch.randn(2, 1, SIZE, SIZE, dtype=torch.float64)
    keypoints, valid = random_keypoints(2, 12)
    out, expected = model(image, keypoints, valid), reference(image, keypoints, valid)
    torch.testing.assert_close(out, expected)
    out.square().mean().backward(), expected.square().mean().backward()
    scale = max(q.grad.abs().max().item() for q in reference.parameters())
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-10 * scale, rtol=1e-8, msg=name)
    for (name, a), b in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, msg=name)


# ----------------------------------------------------------------------------------------------- invariances


def test_kaf_layer_is_permutation_equivariant():
    torch.manual_seed(0)
    layer = KAFLayer(4, 2, dim=16, blocks=2, heads=4, fusion_hidden=8).double()
    features = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    keypoints, valid = random_keypoints(2, 9)
    out = layer(features, keypoints, valid, (SIZE, SIZE))
    permutation = torch.randperm(9)
    permuted = layer(features, keypoints[:, permutation], valid[:, permutation], (SIZE, SIZE))
    torch.testing.assert_close(permuted.features, out.features)
    torch.testing.assert_close(permuted.keypoint_features, out.keypoint_features[:, permutation])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("sampling", ["nearest", "bilinear"])
def test_padding_never_changes_valid_outputs(training, sampling):
    torch.manual_seed(0)
    model = KAFUNet(small(ModelSettings(), sampling=sampling)).double().train(training)
    twin = copy.deepcopy(model)  # training mode updates BatchNorm statistics: compare fresh copies
    image = torch.randn(2, 1, SIZE, SIZE, dtype=torch.float64)
    keypoints, valid = random_keypoints(2, 7)
    padded_keypoints, padded_valid = with_garbage_padding(keypoints, valid, 9)
    encoding = model.encode(image, keypoints, valid)
    padded = twin.encode(image, padded_keypoints, padded_valid)
    for a, b in zip(encoding.skips + [encoding.bottleneck], padded.skips + [padded.bottleneck]):
        torch.testing.assert_close(a, b)
    for a, b in zip(encoding.keypoint_features, padded.keypoint_features):
        torch.testing.assert_close(a[valid], b[:, :7][valid])
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(buffer, dict(twin.named_buffers())[name], msg=name)


def test_no_keypoints_is_defined_and_finite():
    model = KAFUNet(small(ModelSettings())).double()
    image = torch.randn(2, 1, SIZE, SIZE, dtype=torch.float64, requires_grad=True)
    empty_keypoints, empty_valid = torch.zeros(2, 0, 2), torch.zeros(2, 0, dtype=torch.bool)
    invalid_keypoints, invalid_valid = random_keypoints(2, 5)
    invalid_valid[:] = False
    for mode in ("train", "eval"):
        model.train(mode == "train")
        logits = model(image, empty_keypoints, empty_valid)
        assert torch.isfinite(logits).all()
        logits.sum().backward()
        assert torch.isfinite(image.grad).all()
    # eval mode: all-invalid padding gives exactly the keypoint-free network
    torch.testing.assert_close(model(image, invalid_keypoints, invalid_valid), logits)
    # a batch where only one image has keypoints: the other one's keypoint features are finite
    keypoints, valid = random_keypoints(2, 5)
    valid[1] = False
    model.train()
    encoding = model.encode(image, keypoints, valid)
    assert all(torch.isfinite(f).all() for f in encoding.keypoint_features)


def test_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    settings = small(ModelSettings())
    model = KAFUNet(settings)
    projection = BottleneckProjection.from_settings(settings, model.bottleneck_channels)
    global_head = KeypointGlobalHead.from_settings(settings)
    matching = MatchingHead.from_settings(settings)
    image = torch.randn(2, 1, SIZE, SIZE)
    keypoints, valid = random_keypoints(2, 8)
    encoding = model.encode(image, keypoints, valid)
    logits = model.decode(encoding.skips, encoding.bottleneck)
    descriptors = global_head.fuse_levels(encoding.keypoint_features)
    desc_a, desc_b = matching(descriptors, keypoints, valid, descriptors.flip(1), keypoints.flip(1), valid.flip(1),
                              (SIZE, SIZE))
    loss = (logits.square().mean() + projection(encoding.bottleneck).square().mean()
            + global_head.pool(descriptors, valid).square().mean() + matching_scores(desc_a, desc_b).square().mean())
    loss.backward()
    for module in (model, projection, global_head, matching):
        for name, parameter in module.named_parameters():
            assert parameter.grad is not None, name
            assert torch.isfinite(parameter.grad).all(), name
            if not name.endswith("qkv.bias"):  # the key bias has an exactly zero gradient (softmax shift)
                assert parameter.grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------------------------- heads


def test_heads_shapes_and_masking():
    torch.manual_seed(0)
    settings = small(ModelSettings())
    projection = BottleneckProjection(32, 16, 8)
    assert projection(torch.randn(3, 32, 2, 2)).shape == (3, 8)
    head = KeypointGlobalHead.from_settings(settings)
    features = [torch.randn(3, 6, 16) for _ in range(4)]
    valid = torch.rand(3, 6) < 0.5
    valid[2] = False
    assert head(features, valid).shape == (3, 8)
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    mean = masked_mean(x, valid)
    torch.testing.assert_close(mean[0], x[0][valid[0]].mean(0) if valid[0].any() else torch.zeros(5, dtype=x.dtype))
    assert torch.equal(mean[2], torch.zeros(5, dtype=x.dtype))
    with pytest.raises(ValueError, match="4 levels"):
        head(features[:3], valid)


def test_matching_head_shapes_padding_and_scores():
    torch.manual_seed(0)
    head = MatchingHead(16, 4, 3).double().eval()
    keypoints_a, valid_a = random_keypoints(2, 5, seed=1)
    keypoints_b, valid_b = random_keypoints(2, 7, seed=2)
    keypoints_a, keypoints_b = keypoints_a.double(), keypoints_b.double()
    desc_a, desc_b = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 7, 16, dtype=torch.float64)
    out_a, out_b = head(desc_a, keypoints_a, valid_a, desc_b, keypoints_b, valid_b, (SIZE, SIZE))
    assert out_a.shape == (2, 5, 16) and out_b.shape == (2, 7, 16)
    padded_b, padded_valid_b = with_garbage_padding(keypoints_b, valid_b, 4)
    padded_desc_b = torch.cat([desc_b, torch.randn(2, 4, 16, dtype=torch.float64)], dim=1)
    again_a, again_b = head(desc_a, keypoints_a, valid_a, padded_desc_b, padded_b, padded_valid_b, (SIZE, SIZE))
    torch.testing.assert_close(again_a[valid_a], out_a[valid_a])
    torch.testing.assert_close(again_b[:, :7][valid_b], out_b[valid_b])
    scores = matching_scores(out_a, out_b)
    assert scores.shape == (2, 5, 7)
    torch.testing.assert_close(scores[1, 2, 3], out_a[1, 2] @ out_b[1, 3] / math.sqrt(16))


def test_mixed_precision_runs():
    """Under autocast (bfloat16 on the CPU here, float16 on CUDA) the sparse paths keep their dtypes straight."""
    torch.manual_seed(0)
    model = KAFUNet(small(ModelSettings()))
    image = torch.randn(2, 1, SIZE, SIZE)
    keypoints, valid = random_keypoints(2, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(image, keypoints, valid)
    assert logits.shape == (2, 4, SIZE, SIZE) and torch.isfinite(logits.float()).all()
    logits.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_format_parameter_summary_accepts_settings():
    text = format_parameter_summary(small(preset("tiny").model))
    assert text.splitlines()[0].split() == ["part", "parameters", "millions"]
    assert "segmentation" in text
    with pytest.raises(ValueError, match="empty"):
        format_parameter_summary({})


def test_count_flops_counts_a_matrix_product_and_a_convolution():
    from kpssl.models import count_flops

    linear = torch.nn.Linear(6, 5, bias=False)
    x = torch.randn(4, 6)
    assert count_flops(lambda: linear(x)) == 2 * 4 * 6 * 5  # one multiply-add is 2 FLOPs
    conv = torch.nn.Conv2d(3, 2, 3, padding=1, bias=False)
    image = torch.randn(1, 3, 8, 8)
    assert count_flops(lambda: conv(image)) == 2 * 8 * 8 * 2 * 3 * 9


def test_attention_scores_give_the_weights_of_forward():
    from kpssl.models.attention import AttentionBlock

    torch.manual_seed(0)
    block = AttentionBlock(16, 4).double().eval()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, 5:] = False
    _, weights = block(x, valid, need_weights=True)
    z = block.scores(x).masked_fill(~valid[:, None, None, :], float("-inf"))
    torch.testing.assert_close(z.softmax(-1), weights)
    source = torch.randn(2, 5, 16, dtype=torch.float64)
    _, cross = block(x, valid, source, torch.ones(2, 5, dtype=torch.bool), need_weights=True)
    torch.testing.assert_close(block.scores(x, source).softmax(-1), cross)


# ----------------------------------------------------------------------------------------------- sparse scatter


def border_and_padding_case(size: int = 8, extra_invalid: int = 40):
    """Keypoints at all four corners, on every border, colliding, plus many invalid ones (float64)."""
    torch.manual_seed(3)
    last = size - 1
    corners = [[0, 0], [0, last], [last, 0], [last, last], [0, 3], [last, 4], [5, 0], [2, last], [4, 4], [4, 4],
               [4, 5]]
    rows_cols = torch.tensor([corners, corners[::-1]])  # (2, 11, 2)
    padding = torch.randint(0, size, (2, extra_invalid, 2))
    pixels = torch.cat([rows_cols, padding], dim=1)
    valid = torch.cat([torch.ones(2, 11, dtype=torch.bool), torch.zeros(2, extra_invalid, dtype=torch.bool)], dim=1)
    valid[1, 9] = False  # an invalid keypoint on a valid one's pixel
    return pixels[..., 0], pixels[..., 1], valid


def dense_fusion_reference(vectors, rows, cols, valid, weight, bias, size):
    return F.conv2d(scatter_average(vectors, rows, cols, valid, size, size), weight, bias, padding=1)


@pytest.mark.parametrize("size", [8, 3, 1])
def test_sparse_steps_equal_dense_at_borders_with_padding_float64(size):
    rows, cols, valid = border_and_padding_case(8)
    rows, cols = rows.clamp(max=size - 1), cols.clamp(max=size - 1)
    vectors = torch.randn(2, rows.shape[1], 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    weight2 = torch.randn(4, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    bias2 = torch.randn(4, dtype=torch.float64, requires_grad=True)
    spread = spread_keypoints(vectors, rows, cols, valid, weight, bias, size, size)
    # dropped taps are listed off the map with value zero
    off = (spread.rows < 0) | (spread.rows >= size) | (spread.cols < 0) | (spread.cols >= size)
    assert torch.equal(spread.values[off], torch.zeros_like(spread.values[off]))
    assert (spread.rows[off] == -2).all()
    dense1 = dense_fusion_reference(vectors, rows, cols, valid, weight, bias, size)
    torch.testing.assert_close(densify(spread), dense1, rtol=1e-12, atol=1e-12)
    activated = sparse_batch_norm_relu(spread, None, None, None, None, True, 0.1, 1e-5)
    out = sparse_conv3x3_dense(activated, weight2, bias2)
    expected = F.conv2d(F.relu(F.batch_norm(dense1, None, None, None, None, True, 0.1, 1e-5)), weight2, bias2,
                        padding=1)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    upstream = torch.randn_like(expected)
    inputs = [vectors, weight, bias, weight2, bias2]
    grads = torch.autograd.grad((out * upstream).sum(), inputs)
    grads_expected = torch.autograd.grad((expected * upstream).sum(), inputs)
    for name, a, b in zip(["vectors", "weight", "bias", "weight2", "bias2"], grads, grads_expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)
    assert torch.equal(grads[0][~valid], torch.zeros_like(grads[0][~valid]))


def test_sparse_conv3x3_without_keypoints_is_the_bias_convolution():
    weight, bias = torch.randn(5, 6, 3, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    empty = torch.zeros(2, 0, dtype=torch.long)
    out = sparse_conv3x3(torch.zeros(2, 0, 6, dtype=torch.float64), empty, empty, empty.bool(), weight, bias, 4, 4)
    torch.testing.assert_close(out, bias.view(1, 5, 1, 1).expand(2, 5, 4, 4))


def index_add_targets(function):
    """Run ``function``; return the index tensors of every ``index_add`` it made."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, op, types, args=(), kwargs=None):
            if op.overloadpacket in (torch.ops.aten.index_add, torch.ops.aten.index_add_):
                seen.append((args[0].shape, args[2].clone()))
            return op(*args, **(kwargs or {}))

    with Record():
        function()
    return seen


def test_sparse_scatters_never_pile_dropped_entries_onto_one_address():
    """Every scatter adds C-vector rows; dropped taps (off the image, invalid keypoints) spread over the
    buffer. With 11 valid keypoints and 40 padded ones on a 8 x 8 map no row may receive more additions
    than the taps that genuinely overlap there (at most 9) plus its share of the spread entries."""
    rows, cols, valid = border_and_padding_case(8, extra_invalid=40)
    vectors = torch.randn(2, rows.shape[1], 6, dtype=torch.float64)
    weight, weight2 = torch.randn(5, 6, 3, 3, dtype=torch.float64), torch.randn(4, 5, 3, 3, dtype=torch.float64)

    def run():
        spread = spread_keypoints(vectors, rows, cols, valid, weight, None, 8, 8)
        densify(spread)
        sparse_conv3x3_dense(spread, weight2, None)

    calls = index_add_targets(run)
    assert len(calls) == 3
    for shape, index in calls:
        assert len(shape) == 2  # rows of C-vectors, not single scalars
        rows_of_buffer = shape[0]
        spread_share = -(-index.numel() // rows_of_buffer)  # ceil: dropped entries per buffer row
        assert torch.bincount(index).max() <= 9 + spread_share, (shape, torch.bincount(index).max())
