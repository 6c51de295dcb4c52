"""Networks: the UNet backbone, the KAF layer, the KAF-UNet and the self-supervised heads.

=========================  ===================================================================
module                     holds
=========================  ===================================================================
``unet``                   :class:`UNet`, its blocks, and the :class:`Encoding` both networks' encode returns
``attention``              masked BatchNorm, keypoint position encoder, masked attention blocks
``kaf``                    the KAF layer: sample, position, attend, fuse (Yang et al., 2023)
``sparse``                 the fusion D_l computed from the keypoints alone (maps constant but near keypoints)
``kaf_unet``               :class:`KAFUNet`, a UNet with KAF layers (Yang et al., 2023)
``heads``                  projection and matching heads (the paper's Eqs. 1-3)
``summary``                parameter counts per part
=========================  ===================================================================
"""

from kpssl.models.attention import (
    AttentionBlock,
    KeypointMask,
    KeypointPositionEncoder,
    MaskedBatchNorm1d,
    keypoint_mask,
    masked_attention,
    masked_batch_norm,
    normalize_keypoints,
)
from kpssl.models.heads import BottleneckProjection, KeypointGlobalHead, MatchingHead, masked_mean, matching_scores
from kpssl.models.kaf import (
    KAFLayer,
    KAFOutput,
    KeypointFusion,
    check_keypoints,
    level_pixels,
    sample_bilinear,
    sample_nearest,
    scatter_average,
)
from kpssl.models.kaf_unet import KAFEncoding, KAFUNet, check_model_settings
from kpssl.models.sparse import (
    SparseMap,
    collision_counts,
    densify,
    merge_duplicate_pixels,
    sparse_batch_norm_relu,
    sparse_conv3x3,
    sparse_conv3x3_dense,
    spread_keypoints,
)
from kpssl.models.summary import count_flops, count_parameters, format_parameter_summary, parameter_summary
from kpssl.models.unet import Encoding, UNet

__all__ = [
    "UNet",
    "KAFUNet",
    "Encoding",
    "KAFEncoding",
    "KAFLayer",
    "KAFOutput",
    "KeypointFusion",
    "AttentionBlock",
    "KeypointMask",
    "keypoint_mask",
    "KeypointPositionEncoder",
    "MaskedBatchNorm1d",
    "BottleneckProjection",
    "KeypointGlobalHead",
    "MatchingHead",
    "masked_attention",
    "masked_batch_norm",
    "masked_mean",
    "matching_scores",
    "normalize_keypoints",
    "check_keypoints",
    "check_model_settings",
    "level_pixels",
    "sample_nearest",
    "sample_bilinear",
    "collision_counts",
    "scatter_average",
    "SparseMap",
    "spread_keypoints",
    "merge_duplicate_pixels",
    "densify",
    "sparse_conv3x3",
    "sparse_batch_norm_relu",
    "sparse_conv3x3_dense",
    "count_parameters",
    "parameter_summary",
    "count_flops",
    "format_parameter_summary",
]
