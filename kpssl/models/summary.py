"""Parameter counts per part of the networks a :class:`~kpssl.settings.ModelSettings` builds.

The modules are built on PyTorch's ``meta`` device: no memory is allocated, so even the paper's
106.8M-parameter network is counted in well under a second.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kpssl.models.heads import BottleneckProjection, KeypointGlobalHead, MatchingHead
from kpssl.models.kaf_unet import KAFUNet
from kpssl.models.unet import UNet
from kpssl.settings import ModelSettings

__all__ = ["count_parameters", "count_flops", "parameter_summary", "format_parameter_summary"]


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``module``."""
    return sum(p.numel() for p in module.parameters())


def count_flops(step: Callable[[], object]) -> int:
    """Floating-point operations of one call of ``step`` (for example a forward and backward pass).

    Counted by PyTorch's FLOP counter, which covers matrix products, convolutions and attention (one
    multiply-add is 2 FLOPs) and ignores element-wise work, normalisation and indexing.
    """
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def parameter_summary(settings: ModelSettings) -> dict[str, int]:
    """Parameters per part: the KAF-UNet's encoder, KAF layers, bottleneck and decoder, the heads, and
    the plain UNet at the same width for comparison.

    Keys, in order: ``encoder`` (the four conv blocks), ``kaf_level_<l>`` for each KAF level, ``kaf``
    (their sum), ``bottleneck``, ``decoder`` (up-convolutions, blocks, 1x1 head), ``segmentation``
    (the whole KAF-UNet), ``bottleneck_projection``, ``keypoint_global_head`` (0 without KAF levels),
    ``matching_head``, ``heads`` (the three heads), ``pretraining`` (segmentation + heads),
    ``plain_unet``.
    """
    with torch.device("meta"):
        model = KAFUNet(settings)
        plain = UNet(settings.in_channels, settings.classes, settings.width)
        projection = BottleneckProjection.from_settings(settings, model.bottleneck_channels)
        keypoint_head = KeypointGlobalHead.from_settings(settings) if model.levels else None
        matching = MatchingHead.from_settings(settings)
    summary = {"encoder": count_parameters(model.blocks)}
    for level in model.levels:
        summary[f"kaf_level_{level}"] = count_parameters(model.kaf[str(level)])
    summary["kaf"] = count_parameters(model.kaf)
    summary["bottleneck"] = count_parameters(model.bottleneck)
    summary["decoder"] = count_parameters(model.decoder)
    summary["segmentation"] = count_parameters(model)
    summary["bottleneck_projection"] = count_parameters(projection)
    summary["keypoint_global_head"] = count_parameters(keypoint_head) if keypoint_head is not None else 0
    summary["matching_head"] = count_parameters(matching)
    summary["heads"] = summary["bottleneck_projection"] + summary["keypoint_global_head"] + summary["matching_head"]
    summary["pretraining"] = summary["segmentation"] + summary["heads"]
    summary["plain_unet"] = count_parameters(plain)
    return summary


def format_parameter_summary(summary: dict[str, int] | ModelSettings, title: str | None = None) -> str:
    """A plain-text table of parameter counts (exact and in millions).

    ``summary`` is :func:`parameter_summary`'s dict, or the :class:`ModelSettings` to count.
    """
    if isinstance(summary, ModelSettings):
        summary = parameter_summary(summary)
    if not summary:
        raise ValueError("nothing to format: the summary is empty")
    width = max(len(name) for name in summary)
    lines = [title] if title else []
    lines.append(f"{'part':<{width}}  {'parameters':>12}  {'millions':>8}")
    for name, count in summary.items():
        lines.append(f"{name:<{width}}  {count:>12,}  {count / 1e6:>8.2f}")
    return "\n".join(lines)
