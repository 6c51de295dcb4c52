"""Local loss, Eq. 2 of the paper: optimal-transport keypoint matching with a dustbin.

The pipeline (after SuperGlue, Sarlin et al., CVPR 2020, as used by Yang et al., NeurIPS 2023):

1. a matching head scores every keypoint pair of the two slices, ``S (B, M, N)``;
2. :func:`log_sinkhorn` appends a dustbin row and column whose scores are one learnable number
   (:class:`MatchingLoss` holds it) and solves an entropic optimal-transport problem in log space,
   giving the log-assignment ``log P (B, M+1, N+1)``;
3. :func:`matching_loss` is the negative log-likelihood of the known correspondences under ``P``::

       L_local = - sum_{(a,b) matched} log P_ab
                 - sum_{a unmatched} log P_{a,dustbin} - sum_{b unmatched} log P_{dustbin,b}

   normalised as in the authors' code by default: the matched terms and the dustbin terms are each
   averaged per sample, then over the batch, and weighted 0.45 and 1.0 (the plain sum is an option).

The authors' code adds an optional term, :func:`local_contrastive_loss`: a supervised-contrastive
loss between the keypoint embeddings of the two slices with matched pairs as positives (not in the
paper; off by default).

Padding. Batches hold ``K`` keypoints per slice with validity masks. A padded keypoint carries no mass
in the transport problem, and its row or column of ``log P`` is ``-inf`` (``P = 0``): padding never
changes the valid entries of ``log P``. Unlike the authors' code, nothing is ever written at index
``-1`` for an unmatched keypoint (see the book's page of deviations): index ``-1`` is only read after clamping to 0 and
masking the result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from kpssl.settings import PretrainSettings

from kpssl.losses.contrastive import masked_supervised_contrastive

__all__ = [
    "log_sinkhorn",
    "matched_pairs",
    "matching_loss",
    "NORMALISATIONS",
    "local_contrastive_loss",
    "MatchingOutput",
    "MatchingLoss",
]

# Log-mass of an empty row or column and log-score of a cell touching one during the iterations.
# Finite (unlike -inf) so that no logsumexp ever sees a row of -inf (NaN gradients); large enough
# that exp() of it, plus any realistic score, is exactly 0 in float32 and float64.
_NEG = -1e9


def _check_valid(valid: Tensor | None, shape: tuple[int, int], name: str, device: torch.device) -> Tensor:
    if valid is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if valid.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(valid.shape)}")
    if valid.dtype != torch.bool:
        raise ValueError(f"{name} must be bool, got {valid.dtype}")
    return valid


def log_sinkhorn(
    scores: Tensor,
    dustbin: Tensor | float,
    iterations: int = 100,
    valid1: Tensor | None = None,
    valid2: Tensor | None = None,
) -> Tensor:
    """Log-space Sinkhorn with a dustbin row and column (the ``log P`` of Eq. 2).

    Per sample, with ``m`` valid keypoints in image 1 and ``n`` in image 2:

    * couplings: ``scores`` bordered by a dustbin column and row, every dustbin cell scoring
      ``dustbin`` (the dustbin-dustbin cell included);
    * marginals (SuperGlue's): each valid keypoint has mass 1, the dustbin row mass ``n``, the dustbin
      column mass ``m``, padded keypoints mass 0; both sides total ``m + n``. The iterations run on
      the marginals divided by ``m + n`` and the plan is multiplied back by ``m + n``, so that
      ``P = exp(log P)`` has: rows of valid keypoints summing to 1, the dustbin row summing to ``n``,
      columns of valid keypoints summing to 1, the dustbin column summing to ``m``;
    * each iteration updates the row potentials then the column potentials, so the column sums hold
      exactly after any number of iterations and the row sums as the iterations converge.

    Cells in a row or column of zero mass are ``-inf`` (``P = 0``): the rows and columns of padded
    keypoints, the dustbin row when ``n = 0`` and the dustbin column when ``m = 0``. A sample with
    ``m = n = 0`` is all ``-inf``; one with ``m = 0 < n`` sends the dustbin row to every valid column
    with ``P = 1`` (and symmetrically). Padded keypoints never change the valid cells.

    Args:
        scores: ``(B, M, N)`` pair scores (the paper: ``<d_a, d_b> / sqrt(d)``); any float dtype.
        dustbin: scalar tensor (a learnable parameter) or float, the score of every dustbin cell.
        iterations: number of Sinkhorn iterations, ``>= 1`` (paper: 100).
        valid1: ``(B, M)`` bool, ``None`` for all valid; valid2: ``(B, N)`` bool likewise.

    Returns:
        ``log P (B, M+1, N+1)`` in float32 (float64 if ``scores`` is float64), computed outside any
        autocast region; the last row and column are the dustbins.
    """
    if scores.dim() != 3:
        raise ValueError(f"scores must have shape (B, M, N), got {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be floating point, got {scores.dtype}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    b, m, n = scores.shape
    valid1 = _check_valid(valid1, (b, m), "valid1", scores.device)
    valid2 = _check_valid(valid2, (b, n), "valid2", scores.device)
    dustbin = torch.as_tensor(dustbin, device=scores.device)
    if dustbin.numel() != 1:
        raise ValueError(f"dustbin must be a scalar, got shape {tuple(dustbin.shape)}")

    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=scores.device.type, enabled=False):
        alpha = dustbin.to(dtype).reshape(1, 1, 1)
        couplings = torch.cat(
            [
                torch.cat([scores.to(dtype), alpha.expand(b, m, 1)], dim=2),  # (B, M, N+1)
                alpha.expand(b, 1, n + 1),  # (B, 1, N+1)
            ],
            dim=1,
        )  # (B, M+1, N+1)

        count1 = valid1.sum(dim=1).to(dtype)  # (B,) m
        count2 = valid2.sum(dim=1).to(dtype)  # (B,) n
        row_mass = torch.cat([valid1.to(dtype), count2[:, None]], dim=1)  # (B, M+1)
        col_mass = torch.cat([valid2.to(dtype), count1[:, None]], dim=1)  # (B, N+1)
        log_total = (count1 + count2).clamp(min=1).log()  # (B,) log(m + n); 0 if m = n = 0

        row_live = row_mass > 0
        col_live = col_mass > 0
        log_mu = torch.where(row_live, row_mass.clamp(min=1).log() - log_total[:, None], _NEG)  # (B, M+1)
        log_nu = torch.where(col_live, col_mass.clamp(min=1).log() - log_total[:, None], _NEG)  # (B, N+1)
        live = row_live[:, :, None] & col_live[:, None, :]  # (B, M+1, N+1)
        couplings = couplings.masked_fill(~live, _NEG)

        u = torch.zeros_like(log_mu)
        v = torch.zeros_like(log_nu)
        for _ in range(iterations):
            u = log_mu - torch.logsumexp(couplings + v[:, None, :], dim=2)
            v = log_nu - torch.logsumexp(couplings + u[:, :, None], dim=1)

        log_p = couplings + u[:, :, None] + v[:, None, :] + log_total[:, None, None]
        return log_p.masked_fill(~live, float("-inf"))


def _check_matches(match: Tensor, shape: tuple[int, int], other: int, name: str, values: bool = True) -> Tensor:
    """Check shape and dtype (free) and, with ``values``, the range ``[-1, other - 1]`` (this reads the
    tensor on the host: a synchronisation on a GPU and a graph break under ``torch.compile``)."""
    if match.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(match.shape)}")
    if match.dtype.is_floating_point or match.dtype == torch.bool or match.is_complex():
        raise ValueError(f"{name} must be an integer tensor (int64), got {match.dtype}")
    match = match.long()
    if values and match.numel() and bool(((match < -1) | (match >= other)).any()):
        bad = match[(match < -1) | (match >= other)][0].item()
        raise ValueError(f"{name} entries must lie in [-1, {other - 1}], got {bad}")
    return match


def _partner_valid(match: Tensor, valid_other: Tensor) -> Tensor:
    """``(B, K)`` bool: the keypoint has a partner (``match >= 0``) and the partner is valid."""
    if valid_other.shape[1] == 0:
        return torch.zeros_like(match, dtype=torch.bool)
    safe = match.clamp(min=0)  # -1 becomes a harmless 0; the result is masked by match >= 0
    return (match >= 0) & valid_other.gather(1, safe)  # (B, K)


def matched_pairs(
    match12: Tensor,
    match21: Tensor,
    valid1: Tensor,
    valid2: Tensor,
    check_consistency: bool = True,
) -> tuple[Tensor, Tensor]:
    """Which keypoints take part in a usable match (both ends valid).

    Args:
        match12: ``(B, M)`` int, partner in image 2 or ``-1``; match21: ``(B, N)`` likewise.
        valid1: ``(B, M)`` bool; valid2: ``(B, N)`` bool.
        check_consistency: raise ``ValueError`` unless every entry lies in ``[-1, size - 1]`` and every
            usable match is mutual (``match21[match12[a]] == a`` and ``match12[match21[b]] == b``).
            These checks read the values on the host (a GPU synchronisation, a ``torch.compile`` graph
            break); ``False`` skips them for data checked where it was made
            (:func:`kpssl.keypoints.check_pair_batch`), leaving only the free shape and dtype checks.

    Returns:
        ``paired1 (B, M)`` and ``paired2 (B, N)`` bool: valid and matched to a valid keypoint. A valid
        keypoint whose partner is padded (e.g. it left the crop) counts as unmatched.
    """
    if valid1.dim() != 2 or valid2.dim() != 2 or valid1.shape[0] != valid2.shape[0]:
        raise ValueError(f"valid1, valid2 must be (B, M), (B, N), got {tuple(valid1.shape)}, {tuple(valid2.shape)}")
    b, m = valid1.shape
    n = valid2.shape[1]
    valid1 = _check_valid(valid1, (b, m), "valid1", valid1.device)
    valid2 = _check_valid(valid2, (b, n), "valid2", valid2.device)
    match12 = _check_matches(match12, (b, m), n, "match12", check_consistency)
    match21 = _check_matches(match21, (b, n), m, "match21", check_consistency)
    paired1 = valid1 & _partner_valid(match12, valid2)  # (B, M)
    paired2 = valid2 & _partner_valid(match21, valid1)  # (B, N)
    if check_consistency and (m > 0 and n > 0):
        index1 = torch.arange(m, device=match12.device)
        index2 = torch.arange(n, device=match21.device)
        back = match21.gather(1, match12.clamp(min=0))  # (B, M) match21[match12[a]]
        forth = match12.gather(1, match21.clamp(min=0))  # (B, N) match12[match21[b]]
        broken1 = paired1 & (back != index1)
        broken2 = paired2 & (forth != index2)
        if bool(broken1.any() | broken2.any()):
            raise ValueError(
                "match12 and match21 disagree: every match between valid keypoints must be mutual "
                f"({int(broken1.sum())} from image 1 and {int(broken2.sum())} from image 2 are not)"
            )
    return paired1, paired2


NORMALISATIONS = ("authors", "sum")


def matching_loss(
    log_p: Tensor,
    match12: Tensor,
    match21: Tensor,
    valid1: Tensor,
    valid2: Tensor,
    matched_weight: float = 0.45,
    unmatched_weight: float = 1.0,
    log_clamp: float = -100.0,
    check_consistency: bool = True,
    normalisation: str = "authors",
) -> Tensor:
    """Eq. 2: negative log-likelihood of the correspondences under the log-assignment.

    ``log P`` is clamped to ``[log_clamp, 0]``. A pair counts only when both keypoints are valid; a
    valid keypoint whose partner is padded is unmatched. Per sample ``s`` there are two groups of
    terms, the matched pairs ``-log P_ab`` and the dustbin terms ``-log P_{a,dustbin}``,
    ``-log P_{dustbin,b}`` of the valid unmatched keypoints of both images.

    ``normalisation="authors"`` (default; the authors' code, which produced the paper's numbers)::

        L = w_m * mean_s( mean of the matched terms of s )
            + w_u * mean_s( mean of the dustbin terms of s )

    where both outer means run over all ``B`` samples and a sample without matched (or without
    dustbin) terms contributes 0 to that mean. Each group is normalised by its own size, so the
    handful of matched pairs weighs as much as the many dustbin terms.

    ``normalisation="sum"`` (Eq. 2 as printed, with the weights on its two groups)::

        L = mean_s( w_m * sum of the matched terms of s + w_u * sum of the dustbin terms of s )

    With ``w_m = w_u = 1`` this is the paper's plain sum, averaged over the batch. A batch without
    any term gives ``0`` (attached to ``log_p``, no NaN) under both.

    Args:
        log_p: ``(B, M+1, N+1)`` from :func:`log_sinkhorn`.
        match12: ``(B, M)`` int64, partner in image 2 or ``-1``; match21: ``(B, N)`` likewise.
        valid1: ``(B, M)`` bool; valid2: ``(B, N)`` bool.
        matched_weight: ``w_m`` (authors: 0.45); unmatched_weight: ``w_u`` (authors: 1.0).
        log_clamp: lower clamp of ``log P`` (authors: -100).
        check_consistency: see :func:`matched_pairs`.
        normalisation: ``"authors"`` or ``"sum"``, see above.

    Returns:
        Scalar loss.
    """
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {normalisation!r}; expected one of {', '.join(NORMALISATIONS)}")
    if log_p.dim() != 3:
        raise ValueError(f"log_p must have shape (B, M+1, N+1), got {tuple(log_p.shape)}")
    b, m, n = log_p.shape[0], log_p.shape[1] - 1, log_p.shape[2] - 1
    if m < 0 or n < 0:
        raise ValueError(f"log_p must include a dustbin row and column, got {tuple(log_p.shape)}")
    if valid1.shape != (b, m) or valid2.shape != (b, n):
        raise ValueError(
            f"valid1, valid2 must have shapes {(b, m)}, {(b, n)} to fit log_p {tuple(log_p.shape)}, "
            f"got {tuple(valid1.shape)}, {tuple(valid2.shape)}"
        )
    if not log_clamp < 0:
        raise ValueError(f"log_clamp must be < 0, got {log_clamp}")
    paired1, paired2 = matched_pairs(match12, match21, valid1, valid2, check_consistency)
    unmatched1 = valid1 & ~paired1  # (B, M)
    unmatched2 = valid2 & ~paired2  # (B, N)

    clamped = log_p.clamp(min=log_clamp, max=0.0)
    zero = clamped.new_zeros(())
    if n > 0:
        partner = match12.long().clamp(min=0)  # (B, M) -1 read as 0, masked by paired1
        matched = clamped[:, :m, :n].gather(2, partner[:, :, None]).squeeze(2)  # (B, M) log P_{a, match12[a]}
        matched_sum = -torch.where(paired1, matched, zero).sum(dim=1)  # (B,)
    else:
        matched_sum = clamped.new_zeros(b)
    dustbin_sum = -(
        torch.where(unmatched1, clamped[:, :m, n], zero).sum(dim=1)  # (B,) sum log P_{a, dustbin}
        + torch.where(unmatched2, clamped[:, m, :n], zero).sum(dim=1)  # (B,) sum log P_{dustbin, b}
    )  # (B,)

    if b == 0:
        return clamped.sum()  # 0, attached
    if normalisation == "sum":
        return (matched_weight * matched_sum + unmatched_weight * dustbin_sum).mean()
    matched_count = paired1.sum(dim=1).clamp(min=1).to(clamped.dtype)  # (B,) 1 where empty: its sum is 0
    dustbin_count = (unmatched1.sum(dim=1) + unmatched2.sum(dim=1)).clamp(min=1).to(clamped.dtype)  # (B,)
    matched_mean = (matched_sum / matched_count).mean()  # mean over all B samples
    dustbin_mean = (dustbin_sum / dustbin_count).mean()
    return matched_weight * matched_mean + unmatched_weight * dustbin_mean


def local_contrastive_loss(
    desc1: Tensor,
    desc2: Tensor,
    match12: Tensor,
    valid1: Tensor,
    valid2: Tensor,
    temperature: float = 0.1,
    base_temperature: float = 0.07,
) -> Tensor:
    """Optional fourth term (authors' code, not in the paper): contrast matched keypoint embeddings.

    Per sample, the valid keypoints of both images form one set of views; the positive of keypoint
    ``a`` of image 1 is its partner ``match12[a]`` in image 2 and vice versa, when both are valid.
    Every other valid keypoint of the sample (either image) is a negative. The per-anchor loss is
    Eq. 1's ``L_i`` (cosine similarity, temperature ``tau``); anchors are the matched keypoints only
    (an unmatched keypoint is never anyone's positive, only a negative). The loss is the mean over a
    sample's anchors, then over the samples that have anchors (``0`` if none), times
    ``tau / base_tau`` as in :func:`kpssl.losses.contrastive.supervised_contrastive_loss`.

    Args:
        desc1: ``(B, M, D)`` keypoint embeddings of image 1; desc2: ``(B, N, D)`` of image 2.
        match12: ``(B, M)`` int64 partner in image 2 or ``-1``.
        valid1: ``(B, M)`` bool; valid2: ``(B, N)`` bool.
        temperature: ``tau > 0``; base_temperature: ``base_tau > 0`` (authors: 0.07).

    Returns:
        Scalar loss.
    """
    if not base_temperature > 0:
        raise ValueError(f"base_temperature must be > 0, got {base_temperature}")
    if desc1.dim() != 3 or desc2.dim() != 3 or desc1.shape[0] != desc2.shape[0] or desc1.shape[2] != desc2.shape[2]:
        raise ValueError(f"desc1, desc2 must be (B, M, D), (B, N, D), got {tuple(desc1.shape)}, {tuple(desc2.shape)}")
    b, m, _ = desc1.shape
    n = desc2.shape[1]
    valid1 = _check_valid(valid1, (b, m), "valid1", desc1.device)
    valid2 = _check_valid(valid2, (b, n), "valid2", desc1.device)
    match12 = _check_matches(match12, (b, m), n, "match12")
    paired1 = valid1 & _partner_valid(match12, valid2)  # (B, M)

    partner = match12[:, :, None] == torch.arange(n, device=match12.device)  # (B, M, N) one-hot, -1 hits nothing
    cross = partner & paired1[:, :, None]  # (B, M, N) positives image 1 -> image 2
    positives = torch.cat(
        [
            torch.cat([torch.zeros(b, m, m, dtype=torch.bool, device=desc1.device), cross], dim=2),
            torch.cat([cross.transpose(1, 2), torch.zeros(b, n, n, dtype=torch.bool, device=desc1.device)], dim=2),
        ],
        dim=1,
    )  # (B, M+N, M+N)
    dtype = torch.promote_types(desc1.dtype, desc2.dtype)
    z = torch.cat([desc1.to(dtype), desc2.to(dtype)], dim=1)  # (B, M+N, D)
    members = torch.cat([valid1, valid2], dim=1)  # (B, M+N)
    loss, anchor = masked_supervised_contrastive(z, positives, members, temperature)  # (B, M+N) each
    anchors = anchor.sum(dim=1)  # (B,)
    per_sample = loss.sum(dim=1) / anchors.clamp(min=1).to(loss.dtype)  # (B,)
    return (temperature / base_temperature) * per_sample.sum() / (anchors > 0).sum().clamp(min=1).to(loss.dtype)


class MatchingOutput(NamedTuple):
    """What :class:`MatchingLoss` returns: the loss and the log-assignment it came from."""

    loss: Tensor  # scalar
    log_assignment: Tensor  # (B, M+1, N+1)


class MatchingLoss(nn.Module):
    """Eq. 2 as a module: holds the learnable dustbin score and the loss settings.

    ``forward(scores, match12, match21, valid1, valid2)`` runs :func:`log_sinkhorn` then
    :func:`matching_loss`. The dustbin is a parameter of this module: give it to the optimiser.

    The attribute ``check_matches`` (default True) checks the match values on every call (see
    :func:`matched_pairs`); the pretraining loop sets it False, since
    :func:`kpssl.keypoints.collate_pairs` has checked every batch on the CPU already, so that its step
    runs without host synchronisations or graph breaks.
    """

    def __init__(
        self,
        dustbin_init: float = 1.0,
        iterations: int = 100,
        matched_weight: float = 0.45,
        unmatched_weight: float = 1.0,
        log_clamp: float = -100.0,
        normalisation: str = "authors",
    ) -> None:
        super().__init__()
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"unknown normalisation {normalisation!r}; expected one of {', '.join(NORMALISATIONS)}")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
        if not log_clamp < 0:
            raise ValueError(f"log_clamp must be < 0, got {log_clamp}")
        self.dustbin = nn.Parameter(torch.tensor(float(dustbin_init)))
        self.iterations = iterations
        self.matched_weight = float(matched_weight)
        self.unmatched_weight = float(unmatched_weight)
        self.log_clamp = float(log_clamp)
        self.normalisation = normalisation
        self.check_matches = True

    @classmethod
    def from_settings(cls, settings: PretrainSettings) -> "MatchingLoss":
        """Build from :class:`kpssl.settings.PretrainSettings`."""
        return cls(
            dustbin_init=settings.dustbin_init,
            iterations=settings.sinkhorn_iterations,
            matched_weight=settings.matched_weight,
            unmatched_weight=settings.unmatched_weight,
            log_clamp=settings.log_clamp,
            normalisation=settings.matching_normalisation,
        )

    def log_assignment(self, scores: Tensor, valid1: Tensor | None = None, valid2: Tensor | None = None) -> Tensor:
        """``scores (B, M, N)`` -> ``log P (B, M+1, N+1)`` with this module's dustbin."""
        return log_sinkhorn(scores, self.dustbin, self.iterations, valid1, valid2)

    def forward(
        self, scores: Tensor, match12: Tensor, match21: Tensor, valid1: Tensor, valid2: Tensor
    ) -> MatchingOutput:
        """``scores (B, M, N)``, matches ``(B, M)``/``(B, N)``, masks -> (scalar loss, ``log P``)."""
        log_p = self.log_assignment(scores, valid1, valid2)
        loss = matching_loss(
            log_p, match12, match21, valid1, valid2, self.matched_weight, self.unmatched_weight, self.log_clamp,
            normalisation=self.normalisation, check_consistency=self.check_matches,
        )
        return MatchingOutput(loss, log_p)

    def extra_repr(self) -> str:
        return (
            f"iterations={self.iterations}, matched_weight={self.matched_weight}, "
            f"unmatched_weight={self.unmatched_weight}, log_clamp={self.log_clamp}, "
            f"normalisation={self.normalisation!r}"
        )
