"""The networks each pretraining method trains, and the loss terms they produce (the paper's Eqs. 1-3).

``kaf``     KAF-UNet encoder; L = w1 L_PCL (bottleneck) + w2 L_global (keypoints) + w3 L_local (Eq. 3);
            views: slice i and a neighbouring slice.
``pcl``     UNet encoder; Eq. 1 on the bottleneck vector with the PCL rule (Zeng et al., 2021).
``gcl``     UNet encoder; Eq. 1 with the GCL rule (same partition; the global part of Chaitanya et al.).
``simclr``  UNet encoder; Eq. 1 with the SimCLR rule (the other view only).
            The three baselines' views are two independent augmentations of the same slice.

Every method encodes each view in its own forward pass, so BatchNorm never normalises a view together
with its positive (as in the authors' code).

The segmentation models fine-tuned later are ``UNet`` (random, simclr, gcl, pcl) and ``KAFUNet``
(KAF random, kaf); pretraining trains their encoders, and fine-tuning loads those weights.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..losses.contrastive import contrastive_loss
from ..losses.matching import MatchingLoss, local_contrastive_loss
from ..losses.total import total_loss
from ..models.heads import BottleneckProjection, KeypointGlobalHead, MatchingHead, matching_scores
from ..models.kaf_unet import KAFUNet
from ..models.unet import Encoding, UNet
from ..settings import ModelSettings, PretrainSettings
from .methods import FINETUNE_METHODS, KAF_NETWORK, PRETRAIN_METHODS

__all__ = ["METHODS", "VIEWS", "segmentation_model", "PretrainNetwork", "gather"]

METHODS = PRETRAIN_METHODS  # the methods that pretrain (kpssl.train.methods names them all)
RULE = {"kaf": "pcl", "pcl": "pcl", "gcl": "gcl", "simclr": "simclr"}
# The two views of a pretraining sample: KAF pairs slice i with a neighbouring slice (its correspondences
# need two slices); SimCLR, GCL and PCL augment the same slice twice, as in their papers.
VIEWS = {"kaf": "neighbour", "pcl": "same", "gcl": "same", "simclr": "same"}


def segmentation_model(method: str, settings: ModelSettings) -> nn.Module:
    """The segmentation network a method fine-tunes: KAF-UNet for ``kaf``/``kaf_random``, else UNet."""
    if method not in FINETUNE_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(FINETUNE_METHODS)}")
    if method in KAF_NETWORK:
        return KAFUNet(settings)
    return UNet(settings.in_channels, settings.classes, settings.width)


def gather(x: Tensor) -> Tensor:
    """Concatenate a tensor over all processes along dim 0, keeping gradients (identity when alone)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x), dim=0)


class PretrainNetwork(nn.Module):
    """Backbone plus the heads and learnable loss parameters of one pretraining method.

    ``forward(batch) -> (total loss, {term: detached value})`` on a pretraining batch (CONTRIBUTING.md).
    Under ``torchrun`` the global embeddings are gathered from all processes, so Eq. 1 sees the global
    batch exactly as a single process would.
    """

    def __init__(self, method: str, model: ModelSettings, pretrain: PretrainSettings):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown pretraining method {method!r}; expected one of {', '.join(METHODS)}")
        self.method = method
        self.settings = pretrain
        self.backbone = segmentation_model(method, model)
        self.backbone.decoder.requires_grad_(False)  # pretraining trains the encoder; fine-tuning the decoder
        self.projection = BottleneckProjection.from_settings(model, self.backbone.bottleneck_channels)
        if method == "kaf":
            self.keypoint_head = KeypointGlobalHead.from_settings(model)
            self.matching_head = MatchingHead.from_settings(model)
            self.matching_loss = MatchingLoss.from_settings(pretrain)

    def encoder_state(self) -> dict[str, Tensor]:
        """The backbone's weights (encoder, KAF layers, decoder): what fine-tuning may load."""
        return self.backbone.state_dict()

    def _contrast(self, z1: Tensor, z2: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return contrastive_loss(gather(z1.float()), gather(z2.float()), gather(batch["position"]),
                                gather(batch["partition"]), RULE[self.method], self.settings.temperature,
                                self.settings.pcl_threshold, self.settings.base_temperature)

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        # each view in its own pass, as the authors do: BatchNorm statistics (encoder, masked keypoint
        # BatchNorm, heads) never mix a view with its positive
        encoding1 = self.backbone.encode(batch["view1"], batch["keypoints1"], batch["valid1"])
        encoding2 = self.backbone.encode(batch["view2"], batch["keypoints2"], batch["valid2"])
        if self.method != "kaf":
            z1 = self.projection(encoding1.bottleneck)  # (B, projection_dim)
            z2 = self.projection(encoding2.bottleneck)
            term = self._contrast(z1, z2, batch)
            return term, {"contrastive": term.detach().float(), "total": term.detach().float()}
        return self._kaf_loss(encoding1, encoding2, batch)

    def _kaf_loss(self, encoding1: Encoding, encoding2: Encoding,
                  batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Eq. 3: w1 L_PCL on the bottlenecks, w2 L_global and w3 L_local on the keypoint features."""
        s = self.settings
        w1, w2, w3 = s.loss_weights
        pcl = None
        if w1:
            pcl = self._contrast(self.projection(encoding1.bottleneck), self.projection(encoding2.bottleneck), batch)
        descriptors1 = self.keypoint_head.fuse_levels(encoding1.keypoint_features)  # (B, K, d)
        descriptors2 = self.keypoint_head.fuse_levels(encoding2.keypoint_features)  # (B, K, d)
        global_term = None
        if w2:
            g1 = self.keypoint_head.pool(descriptors1, batch["valid1"])  # (B, projection_dim)
            g2 = self.keypoint_head.pool(descriptors2, batch["valid2"])
            global_term = self._contrast(g1, g2, batch)
        local = local_c = None
        if w3 or s.local_contrastive_weight:
            size = tuple(batch["view1"].shape[-2:])
            d1, d2 = self.matching_head(descriptors1, batch["keypoints1"], batch["valid1"],
                                        descriptors2, batch["keypoints2"], batch["valid2"], size)
            if w3:
                scores = matching_scores(d1.float(), d2.float())  # (B, K, K)
                local = self.matching_loss(scores, batch["match12"], batch["match21"], batch["valid1"],
                                           batch["valid2"]).loss
            if s.local_contrastive_weight:
                local_c = local_contrastive_loss(d1.float(), d2.float(), batch["match12"], batch["valid1"],
                                                 batch["valid2"], s.temperature, s.base_temperature)
        return total_loss(pcl, global_term, local, s.loss_weights, local_c, s.local_contrastive_weight)
