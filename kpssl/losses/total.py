"""The pretraining objective, Eq. 3 of the paper: a weighted sum of the three self-supervised terms.

    L = w1 L_PCL + w2 L_global + w3 L_local  (+ w4 L_local_contrastive, the authors' optional term)

``L_PCL`` is Eq. 1 on the bottleneck embeddings, ``L_global`` Eq. 1 on the pooled keypoint
embeddings (both :mod:`kpssl.losses.contrastive`), ``L_local`` Eq. 2 (:mod:`kpssl.losses.matching`).
The paper's best weights are ``(w1, w2, w3) = (1, 1, 0.01)`` and ``w4 = 0``
(``PretrainSettings.loss_weights`` and ``PretrainSettings.local_contrastive_weight``).
"""

from __future__ import annotations

import math

from torch import Tensor

__all__ = ["TERM_NAMES", "total_loss"]

TERM_NAMES = ("pcl", "global", "local", "local_contrastive")


def total_loss(
    pcl_term: Tensor | None,
    global_term: Tensor | None,
    local_term: Tensor | None,
    weights: tuple[float, float, float] = (1.0, 1.0, 0.01),
    local_contrastive_term: Tensor | None = None,
    local_contrastive_weight: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Eq. 3: ``w1 L_PCL + w2 L_global + w3 L_local (+ w4 L_local_contrastive)``.

    A term whose weight is 0 may be ``None`` (not computed, e.g. the ``(1, 0, 0)`` ablation); it is
    then left out of the total. A term with weight 0 that is given is logged but not added (so a NaN
    in an unused term cannot reach the total).

    Args:
        pcl_term, global_term, local_term: scalar losses (or ``None`` where their weight is 0).
        weights: ``(w1, w2, w3)``, finite (paper's best: ``(1, 1, 0.01)``).
        local_contrastive_term: scalar or ``None``; local_contrastive_weight: ``w4`` (default 0).

    Returns:
        ``total`` (scalar, differentiable) and a dict for logging of detached float tensors: the
        given terms under ``"pcl"``, ``"global"``, ``"local"``, ``"local_contrastive"`` (unweighted)
        and ``"total"``.
    """
    if len(weights) != 3:
        raise ValueError(f"weights must be (w1, w2, w3), got {weights!r}")
    all_weights = (*(float(w) for w in weights), float(local_contrastive_weight))
    if not all(math.isfinite(w) for w in all_weights):
        raise ValueError(f"loss weights must be finite, got {all_weights}")
    terms = (pcl_term, global_term, local_term, local_contrastive_term)

    total: Tensor | None = None
    logged: dict[str, Tensor] = {}
    for name, term, weight in zip(TERM_NAMES, terms, all_weights):
        if term is None:
            if weight != 0:
                raise ValueError(f"the {name!r} term has weight {weight} but was not given (None)")
            continue
        if term.dim() != 0:
            raise ValueError(f"the {name!r} term must be a scalar, got shape {tuple(term.shape)}")
        logged[name] = term.detach().float()
        if weight != 0:
            total = weight * term if total is None else total + weight * term
    if total is None:
        raise ValueError("no loss term has a nonzero weight and a value: nothing to optimise")
    logged["total"] = total.detach().float()
    return total, logged
