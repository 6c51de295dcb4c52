"""Settings shared by the training tests: the tiny preset made smaller still."""

from __future__ import annotations

from kpssl.settings import Settings, preset


def small_settings(**changes) -> Settings:
    """The tiny preset made smaller still: 64 px patches, narrow widths, few keypoints and steps."""
    values = {
        "data.patch": 64, "keypoints.max_keypoints": 24, "model.width": 4, "model.descriptor_dim": 16,
        "model.attention_blocks": 1, "model.fusion_hidden": 8, "model.matching_blocks": 2,
        "model.projection_dim": 16, "pretrain.batch_size": 4, "pretrain.epochs": 2, "pretrain.workers": 0,
        "pretrain.sinkhorn_iterations": 5, "finetune.epochs": 2, "finetune.batch_size": 4, "finetune.workers": 0,
    }
    values.update(changes)
    return preset("tiny").replace(**values)
