"""Probes of a representation without labels: does a pretrained encoder know where a slice lies, and
does its keypoint attention single anything out?

* :func:`retrieval_error`: the mean ``|position difference|`` between each slice and its nearest
  neighbour (cosine similarity of the features) among the slices of *other* patients. Slice position
  runs from 0 (base) to 1 (apex), so guessing gives about 1/3 (:func:`chance_retrieval_error`) and a
  representation that orders slices by anatomy gives little. This is what the positional contrastive
  objective trains for (chapter 6).
* :func:`bottleneck_features`: the globally averaged bottleneck of a UNet or KAF-UNet, the part of a
  pretrained encoder fine-tuning builds on.
* :func:`attention_summary`: per KAF level, the mean normalised entropy ``H / log n`` of the last
  block's attention rows and the mean spread of their logits (:func:`kpssl.eval.attention.row_statistics`;
  1 and 0 for uniform attention, chapter 8).
* :func:`probe_encoder`: all of them for one ``encoder.pt``, on the slices :func:`probe_batch` gathers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .attention import kaf_attention, row_statistics

__all__ = ["retrieval_error", "chance_retrieval_error", "bottleneck_features", "attention_summary",
           "probe_batch", "probe_encoder"]


def _check(positions: np.ndarray, groups: np.ndarray, rows: int) -> None:
    if positions.shape != (rows,) or groups.shape != (rows,):
        raise ValueError(f"positions and groups must be ({rows},), got {positions.shape} and {groups.shape}")
    if len(set(groups.tolist())) < 2:
        raise ValueError("retrieval needs slices of at least two patients")


def retrieval_error(features: np.ndarray, positions: np.ndarray, groups: np.ndarray) -> float:
    """Mean ``|positions[i] - positions[j(i)]|`` with ``j(i)`` the most cosine-similar row of ``features``
    ``(S, D)`` among the rows of another group (patient) than ``groups[i]``."""
    features, positions, groups = np.asarray(features, np.float64), np.asarray(positions), np.asarray(groups)
    _check(positions, groups, features.shape[0])
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T
    similarity[groups[:, None] == groups[None, :]] = -np.inf  # the same patient, itself included
    return float(np.abs(positions - positions[similarity.argmax(1)]).mean())


def chance_retrieval_error(positions: np.ndarray, groups: np.ndarray) -> float:
    """The retrieval error of a neighbour drawn uniformly from the other patients' slices."""
    positions, groups = np.asarray(positions, np.float64), np.asarray(groups)
    _check(positions, groups, positions.shape[0])
    other = groups[:, None] != groups[None, :]
    gaps = np.abs(positions[:, None] - positions[None, :])
    return float(((gaps * other).sum(1) / other.sum(1)).mean())  # per slice, then over slices


@torch.no_grad()
def bottleneck_features(backbone: nn.Module, batch: dict[str, torch.Tensor], chunk: int = 64) -> np.ndarray:
    """``(S, C)`` globally averaged bottleneck of every slice of a labelled batch, in evaluation mode."""
    backbone.eval()
    device = next(backbone.parameters()).device
    out = []
    for start in range(0, batch["image"].shape[0], chunk):
        part = {k: batch[k][start:start + chunk].to(device) for k in ("image", "keypoints", "valid")}
        encoding = backbone.encode(part["image"], part["keypoints"], part["valid"])
        out.append(encoding.bottleneck.double().mean((2, 3)).cpu())
    return torch.cat(out).double().numpy()


@torch.no_grad()
def attention_summary(backbone: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per KAF level (``"level1"`` finest): mean ``H / log n`` and mean logit spread of the last block."""
    backbone.eval()
    look = kaf_attention(backbone, batch["image"], batch["keypoints"], batch["valid"])
    summary = {}
    for index, level in enumerate(look.levels):
        entropy, _, spread = row_statistics(look.weights[index][-1], look.logits[index][-1], batch["valid"]).means()
        summary[f"level{level}"] = {"entropy": round(entropy, 4), "logit_spread": round(spread, 4)}
    return summary


def probe_batch(root: str | Path, settings) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """The centre patch of every slice of every volume under ``root`` as one labelled-style batch, and
    ``(S,)`` the patient of each slice (the labels are loaded, as the dataset needs them, but unused)."""
    from ..data import load_volumes
    from ..keypoints import KeypointCache, LabelledKeypointSlices, collate_labelled

    volumes = load_volumes(root, settings.data)
    dataset = LabelledKeypointSlices(volumes, settings, KeypointCache(root), augment=False)
    batch = collate_labelled([dataset[i] for i in range(len(dataset))])
    return batch, np.array([v.case.patient for v in volumes])[batch["volume"].numpy()]


def probe_encoder(encoder: str | Path | None, method: str, settings, batch: dict[str, torch.Tensor],
                  groups: np.ndarray) -> dict:
    """Retrieval error of the bottleneck and (KAF-UNets) the attention summary of one pretrained encoder.

    ``encoder`` is the ``encoder.pt`` of a pretraining run of ``method``, or None for the network at
    its random initialisation (seeded with ``settings.seed``). ``batch`` holds labelled-style slices
    (``image``, ``keypoints``, ``valid``, ``position``) of the patients ``groups`` names, row by row."""
    from ..train.finetune import load_encoder
    from ..train.networks import segmentation_model

    torch.manual_seed(settings.seed)
    network = segmentation_model(method, settings.model)
    if encoder is not None:
        load_encoder(network, encoder, method)
    positions = batch["position"].double().numpy()
    probe = {"retrieval_error": round(retrieval_error(bottleneck_features(network, batch), positions, groups), 4)}
    if hasattr(network, "kaf") and len(network.kaf):
        probe["attention"] = attention_summary(network, batch)
    return probe
