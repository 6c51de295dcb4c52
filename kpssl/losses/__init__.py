"""Self-supervised losses of the paper: Eq. 1 (contrastive), Eq. 2 (matching), Eq. 3 (total)."""

from kpssl.losses.contrastive import (
    RULES,
    ContrastiveLoss,
    contrastive_loss,
    masked_supervised_contrastive,
    positive_mask,
    supervised_contrastive_loss,
)
from kpssl.losses.matching import (
    MatchingLoss,
    MatchingOutput,
    local_contrastive_loss,
    log_sinkhorn,
    matched_pairs,
    matching_loss,
)
from kpssl.losses.total import TERM_NAMES, total_loss

__all__ = [
    "RULES",
    "ContrastiveLoss",
    "contrastive_loss",
    "masked_supervised_contrastive",
    "positive_mask",
    "supervised_contrastive_loss",
    "MatchingLoss",
    "MatchingOutput",
    "local_contrastive_loss",
    "log_sinkhorn",
    "matched_pairs",
    "matching_loss",
    "TERM_NAMES",
    "total_loss",
]
