"""Global contrastive loss, Eq. 1 of the paper, in its supervised-contrastive form.

A batch of ``N`` samples gives ``2N`` views, ordered ``[view 1 of samples 0..N-1, view 2 of samples
0..N-1]``; both views of a sample carry the sample's slice position and partition. For anchor ``i``
with positives ``P(i)`` and cosine similarity ``s``::

    L_i = -1/|P(i)| * sum_{j in P(i)} log( exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau) )

and the loss is the mean of ``L_i`` over the anchors, times ``tau / base_tau``. That factor is not
in Eq. 1 as printed: the authors' code (like the supervised-contrastive reference implementation of
Khosla et al., 2020) multiplies the loss by ``tau / base_tau`` with ``base_tau = 0.07``, i.e. by 1.43
at ``tau = 0.1``, and the weights of Eq. 3 were tuned with it; ``base_temperature=temperature`` gives
Eq. 1 exactly. Three rules say who is a positive
(:func:`positive_mask`):

``simclr``  only the other view of the same sample (Chen et al., 2020);
``gcl``     views in the same partition of their volumes, across volumes (Chaitanya et al., 2020);
``pcl``     views whose slice positions differ by less than a threshold (Zeng et al., 2021).

The other view of the same sample is always a positive and a view is never its own positive.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from kpssl.settings import PretrainSettings

__all__ = [
    "RULES",
    "positive_mask",
    "masked_supervised_contrastive",
    "supervised_contrastive_loss",
    "contrastive_loss",
    "ContrastiveLoss",
]

RULES = ("simclr", "gcl", "pcl")

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def positive_mask(
    rule: str,
    positions: Tensor | None,
    partitions: Tensor | None,
    threshold: float = 0.35,
) -> Tensor:
    """Which of the ``2N`` views are positives of which (Eq. 1's ``P(i)``).

    Args:
        rule: ``"simclr"``, ``"gcl"`` or ``"pcl"``.
        positions: ``(N,)`` float slice positions ``(index + 1) / count``; required for ``"pcl"``.
        partitions: ``(N,)`` int partition indices (``0..S-1``); required for ``"gcl"``.
        threshold: ``"pcl"`` makes ``i, j`` positives when ``|pos_i - pos_j| < threshold``.

    Returns:
        ``(2N, 2N)`` bool, ``True`` where column ``j`` is a positive of anchor row ``i``. Views are
        ordered ``[view 1 of samples 0..N-1, view 2 of samples 0..N-1]``. Symmetric, ``False`` on the
        diagonal, ``True`` between the two views of a sample.
    """
    if rule not in RULES:
        raise ValueError(f"unknown positive rule {rule!r}; expected one of {', '.join(RULES)}")
    if rule == "pcl" and positions is None:
        raise ValueError("rule 'pcl' needs positions (N,), got None")
    if rule == "gcl" and partitions is None:
        raise ValueError("rule 'gcl' needs partitions (N,), got None")
    if positions is None and partitions is None:
        raise ValueError("need positions or partitions (N,) to know the batch size, got neither")
    for name, values in (("positions", positions), ("partitions", partitions)):
        if values is not None and values.dim() != 1:
            raise ValueError(f"{name} must have shape (N,), got {tuple(values.shape)}")
    if positions is not None and partitions is not None and positions.shape != partitions.shape:
        raise ValueError(
            f"positions and partitions must have the same shape (N,), got {tuple(positions.shape)} "
            f"and {tuple(partitions.shape)}"
        )
    if rule == "pcl" and not threshold > 0:
        raise ValueError(f"pcl threshold must be > 0, got {threshold}")

    reference = positions if positions is not None else partitions
    n = reference.shape[0]
    device = reference.device
    sample = torch.arange(n, device=device).repeat(2)  # (2N,) sample index of each view
    same_sample = sample[:, None] == sample[None, :]  # (2N, 2N)

    if rule == "simclr":
        rule_mask = same_sample
    elif rule == "gcl":
        part = partitions.to(device).repeat(2)  # (2N,)
        rule_mask = part[:, None] == part[None, :]
    else:
        pos = positions.to(device=device, dtype=torch.float64).repeat(2)  # (2N,)
        rule_mask = (pos[:, None] - pos[None, :]).abs() < threshold

    not_self = ~torch.eye(2 * n, dtype=torch.bool, device=device)
    return (rule_mask | same_sample) & not_self


def masked_supervised_contrastive(
    z: Tensor,
    positives: Tensor,
    members: Tensor,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """Per-anchor supervised-contrastive losses for a batch of independent sets of views.

    Each of the ``B`` sets holds ``V`` candidate views of which ``members`` take part; a non-member is
    neither an anchor, a positive nor a term of any denominator (padding). Computed in float32 (or
    float64 if ``z`` is float64), outside any autocast region.

    Args:
        z: ``(B, V, D)`` embeddings (not necessarily normalised).
        positives: ``(B, V, V)`` bool, ``True`` where column ``j`` is a positive of anchor ``i``.
        members: ``(B, V)`` bool.
        temperature: ``tau > 0``.

    Returns:
        ``loss (B, V)``: ``L_i`` of Eq. 1 for each anchor, ``0`` where ``anchor`` is ``False``;
        ``anchor (B, V)`` bool: members with at least one member positive other than themselves.
    """
    if z.dim() != 3:
        raise ValueError(f"z must have shape (B, V, D), got {tuple(z.shape)}")
    b, v, _ = z.shape
    if positives.shape != (b, v, v) or positives.dtype != torch.bool:
        raise ValueError(
            f"positives must be bool (B, V, V) = {(b, v, v)}, got {positives.dtype} {tuple(positives.shape)}"
        )
    if members.shape != (b, v) or members.dtype != torch.bool:
        raise ValueError(f"members must be bool (B, V) = {(b, v)}, got {members.dtype} {tuple(members.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=z.device.type, enabled=False):
        # non-members are zeroed first, so that garbage there (even NaN) reaches neither the loss
        # nor, through the similarity matmul's backward, the gradients of the members
        z = z.to(dtype).masked_fill(~members[:, :, None], 0.0)
        unit = F.normalize(z, dim=-1, eps=1e-8)  # (B, V, D)
        logits = unit @ unit.transpose(1, 2) / temperature  # (B, V, V) cosine / tau

        eye = torch.eye(v, dtype=torch.bool, device=z.device)
        pair = members[:, :, None] & members[:, None, :]  # (B, V, V) both members
        others = pair & ~eye  # the k != i of the denominator
        positives = positives & others

        # log( exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau) ), stable via logsumexp. A member
        # without any other member gets a -inf denominator; such a row is never an anchor and the
        # masked_fill below keeps its values (and their gradients) out of the sum.
        denominator = torch.logsumexp(logits.masked_fill(~others, float("-inf")), dim=-1)  # (B, V)
        denominator = denominator.masked_fill(~others.any(dim=-1), 0.0)
        log_prob = logits - denominator[:, :, None]  # (B, V, V)

        count = positives.sum(dim=-1)  # (B, V) |P(i)|
        anchor = members & (count > 0)
        summed = log_prob.masked_fill(~positives, 0.0).sum(dim=-1)  # (B, V)
        loss = -summed / count.clamp(min=1).to(dtype)
        loss = loss.masked_fill(~anchor, 0.0)
    return loss, anchor


def supervised_contrastive_loss(
    z: Tensor, positives: Tensor, temperature: float = 0.1, base_temperature: float = 0.07
) -> Tensor:
    """Eq. 1: mean over anchors of the supervised-contrastive loss with cosine similarity.

    Args:
        z: ``(2N, D)`` embeddings of all views (any float dtype; computed in float32, or float64).
        positives: ``(2N, 2N)`` bool from :func:`positive_mask` (the diagonal is ignored).
        temperature: ``tau > 0`` (paper: 0.1).
        base_temperature: the loss is multiplied by ``tau / base_tau`` (authors: 0.07; pass
            ``temperature`` for Eq. 1 as printed).

    Returns:
        Scalar: ``tau / base_tau`` times the mean of ``L_i`` over anchors with at least one positive;
        ``0`` (still attached to ``z``) when no anchor has one.
    """
    if z.dim() != 2:
        raise ValueError(f"z must have shape (2N, D), got {tuple(z.shape)}")
    if positives.shape != (z.shape[0], z.shape[0]):
        raise ValueError(f"positives must have shape {(z.shape[0], z.shape[0])}, got {tuple(positives.shape)}")
    if not base_temperature > 0:
        raise ValueError(f"base_temperature must be > 0, got {base_temperature}")
    members = torch.ones(1, z.shape[0], dtype=torch.bool, device=z.device)
    loss, anchor = masked_supervised_contrastive(z[None], positives[None].bool(), members, temperature)
    return (temperature / base_temperature) * loss.sum() / anchor.sum().clamp(min=1)


def contrastive_loss(
    z1: Tensor,
    z2: Tensor,
    positions: Tensor | None,
    partitions: Tensor | None,
    rule: str = "pcl",
    temperature: float = 0.1,
    threshold: float = 0.35,
    base_temperature: float = 0.07,
) -> Tensor:
    """Eq. 1 from the two views' embeddings: builds the positive mask and calls the loss.

    Args:
        z1, z2: ``(N, D)`` embeddings of view 1 and view 2 of each sample.
        positions: ``(N,)`` slice positions (``"pcl"``); partitions: ``(N,)`` partitions (``"gcl"``).
        rule, temperature, threshold, base_temperature: see :func:`positive_mask` and
            :func:`supervised_contrastive_loss`.

    Returns:
        Scalar loss.
    """
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must both have shape (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    for name, values in (("positions", positions), ("partitions", partitions)):
        if values is not None and values.shape != (z1.shape[0],):
            raise ValueError(f"{name} must have shape ({z1.shape[0]},), got {tuple(values.shape)}")
    positives = positive_mask(rule, positions, partitions, threshold)
    return supervised_contrastive_loss(torch.cat([z1, z2], dim=0), positives.to(z1.device), temperature,
                                       base_temperature)


class ContrastiveLoss(nn.Module):
    """Eq. 1 as a module holding the rule, temperature and threshold (no parameters)."""

    def __init__(
        self, rule: str = "pcl", temperature: float = 0.1, threshold: float = 0.35, base_temperature: float = 0.07
    ) -> None:
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"unknown positive rule {rule!r}; expected one of {', '.join(RULES)}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.rule = rule
        self.temperature = float(temperature)
        self.threshold = float(threshold)
        self.base_temperature = float(base_temperature)

    @classmethod
    def from_settings(cls, settings: PretrainSettings, rule: str = "pcl") -> "ContrastiveLoss":
        """Build from :class:`kpssl.settings.PretrainSettings` (temperatures, ``pcl_threshold``)."""
        return cls(rule=rule, temperature=settings.temperature, threshold=settings.pcl_threshold,
                   base_temperature=settings.base_temperature)

    def forward(
        self, z1: Tensor, z2: Tensor, positions: Tensor | None = None, partitions: Tensor | None = None
    ) -> Tensor:
        """``z1, z2 (N, D)``, ``positions (N,)``, ``partitions (N,)`` -> scalar."""
        return contrastive_loss(z1, z2, positions, partitions, self.rule, self.temperature, self.threshold,
                                self.base_temperature)

    def extra_repr(self) -> str:
        return (f"rule={self.rule!r}, temperature={self.temperature}, threshold={self.threshold}, "
                f"base_temperature={self.base_temperature}")
