"""Representation probes (kpssl.eval.probes), against plain loops in float64 and known values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kpssl.eval.attention import kaf_attention, row_statistics
from kpssl.eval.probes import (
    attention_summary,
    bottleneck_features,
    chance_retrieval_error,
    probe_encoder,
    retrieval_error,
)
from kpssl.settings import preset
from kpssl.train.networks import segmentation_model


def loop_retrieval_error(features, positions, groups):
    total = 0.0
    for i in range(len(features)):
        best, best_j = -math.inf, None
        for j in range(len(features)):
            if groups[j] == groups[i]:
                continue
            cosine = float(np.dot(features[i], features[j]) / (np.linalg.norm(features[i]) * np.linalg.norm(features[j])))
            if cosine > best:
                best, best_j = cosine, j
        total += abs(positions[i] - positions[best_j])
    return total / len(features)


def test_retrieval_error_matches_a_loop_and_ignores_the_same_patient():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(13, 5))
    positions = rng.uniform(size=13)
    groups = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    assert retrieval_error(features, positions, groups) == pytest.approx(
        loop_retrieval_error(features, positions, groups), abs=1e-12)
    # a copy of each slice inside its own patient must not be found: only other patients count
    doubled = np.concatenate([features, features])
    assert retrieval_error(doubled, np.concatenate([positions, positions]), np.concatenate([groups, groups])) == \
        pytest.approx(retrieval_error(features, positions, groups), abs=1e-12)


def test_features_that_encode_position_retrieve_it_exactly_and_chance_is_the_mean_gap():
    positions = np.tile(np.linspace(0, 1, 6), 3)
    groups = np.repeat([0, 1, 2], 6)
    angle = positions * np.pi / 2  # a direction per position: the nearest neighbour has the same position
    features = np.stack([np.cos(angle), np.sin(angle)], 1)
    assert retrieval_error(features, positions, groups) == 0.0
    expected = np.mean([np.mean([abs(positions[i] - positions[j]) for j in range(18) if groups[j] != groups[i]])
                        for i in range(18)])
    assert chance_retrieval_error(positions, groups) == pytest.approx(expected, abs=1e-12)
    # uniform positions on [0, 1]: the expected gap of two independent draws is 1/3
    many = np.random.default_rng(1).uniform(size=3000)
    assert chance_retrieval_error(many, np.arange(3000) % 30) == pytest.approx(1 / 3, abs=0.02)


def test_retrieval_refuses_shapes_that_do_not_match_and_a_single_patient():
    with pytest.raises(ValueError, match="positions and groups must be"):
        retrieval_error(np.zeros((4, 2)), np.zeros(3), np.arange(4))
    with pytest.raises(ValueError, match="at least two patients"):
        retrieval_error(np.ones((4, 2)), np.zeros(4), np.zeros(4))


def small_batch(settings, slices=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    size, k = settings.data.patch, settings.keypoints.max_keypoints
    valid = torch.rand(slices, k, generator=generator) < 0.7
    valid[:, :2] = True
    return {"image": torch.randn(slices, 1, size, size, generator=generator),
            "keypoints": torch.randint(0, size, (slices, k, 2), generator=generator).float(), "valid": valid,
            "position": torch.linspace(0, 1, slices)}


def test_bottleneck_features_are_the_mean_of_the_bottleneck_and_do_not_depend_on_the_chunk():
    settings = preset("tiny")
    torch.manual_seed(0)
    network = segmentation_model("kaf_random", settings.model).double()
    batch = small_batch(settings)
    batch["image"] = batch["image"].double()
    features = bottleneck_features(network, batch, chunk=4)
    with torch.no_grad():
        bottleneck = network.encode(batch["image"], batch["keypoints"], batch["valid"]).bottleneck
    np.testing.assert_allclose(features, bottleneck.mean((2, 3)).numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(features, bottleneck_features(network, batch, chunk=64), rtol=0, atol=1e-12)


def test_attention_summary_reads_the_last_block_of_every_level():
    settings = preset("tiny")
    torch.manual_seed(0)
    network = segmentation_model("kaf_random", settings.model).double().eval()
    batch = small_batch(settings)
    batch["image"] = batch["image"].double()
    summary = attention_summary(network, batch)
    look = kaf_attention(network, batch["image"], batch["keypoints"], batch["valid"])
    assert list(summary) == [f"level{level}" for level in look.levels]
    for index, level in enumerate(look.levels):
        entropy, _, spread = row_statistics(look.weights[index][-1], look.logits[index][-1], batch["valid"]).means()
        assert summary[f"level{level}"] == {"entropy": round(entropy, 4), "logit_spread": round(spread, 4)}
        assert 0.9 < entropy <= 1.0  # a random network attends almost uniformly (chapter 8)


def test_probe_encoder_of_a_random_unet_has_no_attention_and_of_a_kaf_unet_has_it():
    settings = preset("tiny")
    batch = small_batch(settings)
    groups = np.array([0, 0, 1, 1, 2, 2])
    unet = probe_encoder(None, "unet_random", settings, batch, groups)
    kaf = probe_encoder(None, "kaf_random", settings, batch, groups)
    assert set(unet) == {"retrieval_error"} and set(kaf) == {"retrieval_error", "attention"}
    assert 0 <= unet["retrieval_error"] <= 1 and 0 <= kaf["retrieval_error"] <= 1


def test_probe_batch_holds_every_slice_once_with_its_patient(tmp_path):
    from kpssl.data import load_volumes
    from kpssl.data.synthetic import write_synthetic_acdc
    from kpssl.eval.probes import probe_batch

    write_synthetic_acdc(tmp_path, patients=3, seed=0)
    settings = preset("tiny")
    batch, groups = probe_batch(tmp_path, settings)
    volumes = load_volumes(tmp_path, settings.data)
    assert batch["image"].shape[0] == len(groups) == sum(v.slices for v in volumes)
    assert sorted(set(groups.tolist())) == ["patient001", "patient002", "patient003"]
    for index, volume in enumerate(volumes):  # each row's patient is its volume's
        assert set(groups[batch["volume"].numpy() == index].tolist()) == {volume.case.patient}
