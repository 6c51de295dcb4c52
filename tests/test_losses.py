"""Tests of kpssl.losses: fast code against slow, obvious float64 loops, analytic values, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from kpssl.losses import (
    ContrastiveLoss,
    MatchingLoss,
    contrastive_loss,
    local_contrastive_loss,
    log_sinkhorn,
    matched_pairs,
    matching_loss,
    positive_mask,
    supervised_contrastive_loss,
    total_loss,
)
from kpssl.settings import PretrainSettings

DOUBLE = torch.float64


# --------------------------------------------------------------------------------------------------
# Slow references: plain Python loops over indices, float64 arithmetic.
# --------------------------------------------------------------------------------------------------


def reference_anchor_losses(z: list[list[float]], positives: list[list[bool]], tau: float) -> list[float]:
    """Eq. 1's L_i for every anchor that has a positive (cosine similarity)."""
    norms = [math.sqrt(sum(x * x for x in row)) for row in z]
    unit = [[x / norm for x in row] for row, norm in zip(z, norms)]
    count = len(z)

    def sim(i: int, j: int) -> float:
        return sum(a * b for a, b in zip(unit[i], unit[j]))

    losses = []
    for i in range(count):
        partners = [j for j in range(count) if j != i and positives[i][j]]
        if not partners:
            continue
        denominator = sum(math.exp(sim(i, k) / tau) for k in range(count) if k != i)
        total = 0.0
        for j in partners:
            total += math.log(math.exp(sim(i, j) / tau) / denominator)
        losses.append(-total / len(partners))
    return losses


def reference_contrastive(z: torch.Tensor, positives: torch.Tensor, tau: float) -> float:
    losses = reference_anchor_losses(z.tolist(), positives.tolist(), tau)
    return sum(losses) / len(losses) if losses else 0.0


def reference_positive_mask(
    rule: str, positions: list[float], partitions: list[int], threshold: float
) -> list[list[bool]]:
    n = len(positions)
    mask = [[False] * (2 * n) for _ in range(2 * n)]
    for i in range(2 * n):
        for j in range(2 * n):
            si, sj = i % n, j % n
            if i == j:
                continue
            if si == sj:
                mask[i][j] = True
            elif rule == "gcl":
                mask[i][j] = partitions[si] == partitions[sj]
            elif rule == "pcl":
                mask[i][j] = abs(positions[si] - positions[sj]) < threshold
    return mask


def reference_sinkhorn(
    scores: torch.Tensor, alpha: float, iterations: int, valid1: torch.Tensor, valid2: torch.Tensor
) -> torch.Tensor:
    """SuperGlue's log-space Sinkhorn run on each sample's valid keypoints only, with plain loops."""
    batch, m_all, n_all = scores.shape
    out = torch.full((batch, m_all + 1, n_all + 1), float("-inf"), dtype=DOUBLE)
    for s in range(batch):
        rows = [a for a in range(m_all) if valid1[s, a]]
        cols = [b for b in range(n_all) if valid2[s, b]]
        m, n = len(rows), len(cols)
        # Rows and columns of nonzero mass: valid keypoints, dustbins when the other side has any.
        row_ids = rows + ([m_all] if n > 0 else [])
        col_ids = cols + ([n_all] if m > 0 else [])
        if not row_ids or not col_ids:
            continue
        total = m + n

        def coupling(a: int, b: int) -> float:
            return alpha if a == m_all or b == n_all else float(scores[s, a, b])

        log_mu = {a: math.log((n if a == m_all else 1) / total) for a in row_ids}
        log_nu = {b: math.log((m if b == n_all else 1) / total) for b in col_ids}
        u = {a: 0.0 for a in row_ids}
        v = {b: 0.0 for b in col_ids}
        for _ in range(iterations):
            for a in row_ids:
                u[a] = log_mu[a] - math.log(sum(math.exp(coupling(a, b) + v[b]) for b in col_ids))
            for b in col_ids:
                v[b] = log_nu[b] - math.log(sum(math.exp(coupling(a, b) + u[a]) for a in row_ids))
        for a in row_ids:
            for b in col_ids:
                out[s, a, b] = coupling(a, b) + u[a] + v[b] + math.log(total)
    return out


def _matching_terms(log_p, match12, match21, valid1, valid2, clamp):
    """Per sample: the list of matched terms and the list of dustbin terms, each ``-log P`` clamped."""
    batch, m1, n1 = log_p.shape
    m, n = m1 - 1, n1 - 1

    def nll(s: int, a: int, b: int) -> float:
        return -min(0.0, max(clamp, float(log_p[s, a, b])))

    samples = []
    for s in range(batch):
        matched, dustbin = [], []
        for a in range(m):
            if not valid1[s, a]:
                continue
            b = int(match12[s, a])
            if b >= 0 and valid2[s, b]:
                matched.append(nll(s, a, b))
            else:
                dustbin.append(nll(s, a, n))
        for b in range(n):
            if not valid2[s, b]:
                continue
            a = int(match21[s, b])
            if a >= 0 and valid1[s, a]:
                continue  # counted from image 1
            dustbin.append(nll(s, m, b))
        samples.append((matched, dustbin))
    return samples


def reference_matching(log_p, match12, match21, valid1, valid2, w_m=0.45, w_u=1.0, clamp=-100.0) -> float:
    """The authors' normalisation: w_m * mean_s(mean matched) + w_u * mean_s(mean dustbin), empty = 0."""
    samples = _matching_terms(log_p, match12, match21, valid1, valid2, clamp)
    if not samples:
        return 0.0
    matched_means = [sum(mt) / len(mt) if mt else 0.0 for mt, _ in samples]
    dustbin_means = [sum(dt) / len(dt) if dt else 0.0 for _, dt in samples]
    return w_m * sum(matched_means) / len(samples) + w_u * sum(dustbin_means) / len(samples)


def reference_matching_sum(log_p, match12, match21, valid1, valid2, w_m=1.0, w_u=1.0, clamp=-100.0) -> float:
    """Eq. 2 as printed (weighted groups), summed per sample, averaged over the batch."""
    samples = _matching_terms(log_p, match12, match21, valid1, valid2, clamp)
    return sum(w_m * sum(mt) + w_u * sum(dt) for mt, dt in samples) / len(samples) if samples else 0.0


def reference_supcon_authors(z: torch.Tensor, positives: torch.Tensor, tau: float, base_tau: float) -> float:
    """The supervised-contrastive reference code's formula, written as loops: normalised features,
    log_prob = s_ij / tau - log sum_{k != i} exp(s_ik / tau), mean over positives, times
    -(tau / base_tau), mean over all anchors (each must have a positive)."""
    rows = [[float(x) for x in row] for row in z]
    unit = [[x / math.sqrt(sum(y * y for y in row)) for x in row] for row in rows]
    count = len(unit)
    total = 0.0
    for i in range(count):
        sims = [sum(a * b for a, b in zip(unit[i], unit[k])) / tau for k in range(count)]
        log_denominator = math.log(sum(math.exp(sims[k]) for k in range(count) if k != i))
        pos = [j for j in range(count) if j != i and positives[i, j]]
        mean_log_prob = sum(sims[j] - log_denominator for j in pos) / len(pos)
        total += -(tau / base_tau) * mean_log_prob
    return total / count


def reference_local_contrastive(desc1, desc2, match12, valid1, valid2, tau) -> float:
    batch, m, _ = desc1.shape
    n = desc2.shape[1]
    per_sample = []
    for s in range(batch):
        views = [("1", a) for a in range(m) if valid1[s, a]] + [("2", b) for b in range(n) if valid2[s, b]]
        z = [(desc1[s, k] if side == "1" else desc2[s, k]).tolist() for side, k in views]
        positives = [[False] * len(views) for _ in views]
        for i, (side_i, ki) in enumerate(views):
            for j, (side_j, kj) in enumerate(views):
                if side_i == "1" and side_j == "2" and int(match12[s, ki]) == kj:
                    positives[i][j] = positives[j][i] = True
        losses = reference_anchor_losses(z, positives, tau) if views else []
        if losses:
            per_sample.append(sum(losses) / len(losses))
    return sum(per_sample) / len(per_sample) if per_sample else 0.0


# --------------------------------------------------------------------------------------------------
# Crafted data
# --------------------------------------------------------------------------------------------------


def random_matches(batch: int, m: int, n: int, generator: torch.Generator, p_match: float = 0.6):
    """Mutual one-to-one matches with -1 for unmatched, plus random validity masks."""
    match12 = torch.full((batch, m), -1, dtype=torch.long)
    match21 = torch.full((batch, n), -1, dtype=torch.long)
    for s in range(batch):
        order1 = torch.randperm(m, generator=generator).tolist()
        order2 = torch.randperm(n, generator=generator).tolist()
        for a, b in zip(order1, order2):
            if torch.rand((), generator=generator).item() < p_match:
                match12[s, a], match21[s, b] = b, a
    valid1 = torch.rand(batch, m, generator=generator) < 0.75
    valid2 = torch.rand(batch, n, generator=generator) < 0.75
    return match12, match21, valid1, valid2


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# --------------------------------------------------------------------------------------------------
# Eq. 1: positive masks
# --------------------------------------------------------------------------------------------------


def test_positive_mask_rules_on_crafted_batch():
    positions = torch.tensor([0.10, 0.20, 0.60, 0.90])
    partitions = torch.tensor([0, 0, 2, 3])
    n = 4
    simclr = positive_mask("simclr", positions, partitions)
    expected = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    for i in range(n):
        expected[i, i + n] = expected[i + n, i] = True
    assert torch.equal(simclr, expected)

    gcl = positive_mask("gcl", positions, partitions)
    # samples 0 and 1 share partition 0: all four of their views are positives of each other
    assert gcl[0, 1] and gcl[0, 5] and gcl[4, 1] and gcl[4, 5]
    assert not gcl[0, 2] and not gcl[2, 3] and not gcl[2, 7]
    assert gcl[2, 6] and gcl[3, 7]  # other view always

    pcl = positive_mask("pcl", positions, partitions, threshold=0.35)
    assert pcl[0, 1] and pcl[1, 4] and not pcl[1, 2] and not pcl[0, 2] and pcl[2, 3] and pcl[6, 7]
    assert not pcl[0, 3]
    for mask in (simclr, gcl, pcl):
        assert mask.dtype == torch.bool and mask.shape == (8, 8)
        assert not mask.diagonal().any()
        assert torch.equal(mask, mask.T)


@pytest.mark.parametrize("rule", ["simclr", "gcl", "pcl"])
def test_positive_mask_matches_loop(rule, generator):
    positions = torch.rand(7, generator=generator)
    partitions = torch.randint(0, 4, (7,), generator=generator)
    mask = positive_mask(rule, positions, partitions, threshold=0.2)
    expected = reference_positive_mask(rule, positions.tolist(), partitions.tolist(), 0.2)
    assert mask.tolist() == expected


def test_positive_mask_pcl_threshold_is_strict():
    positions = torch.tensor([0.25, 0.5], dtype=DOUBLE)
    mask = positive_mask("pcl", positions, None, threshold=0.25)
    assert not mask[0, 1] and mask[0, 2]
    assert positive_mask("pcl", positions, None, threshold=0.2500001)[0, 1]


def test_positive_mask_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown positive rule"):
        positive_mask("byol", torch.rand(3), None)
    with pytest.raises(ValueError, match="needs positions"):
        positive_mask("pcl", None, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="needs partitions"):
        positive_mask("gcl", torch.rand(3), None)
    with pytest.raises(ValueError, match="shape"):
        positive_mask("pcl", torch.rand(3, 1), None)
    with pytest.raises(ValueError, match="same shape"):
        positive_mask("pcl", torch.rand(3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="threshold"):
        positive_mask("pcl", torch.rand(3), None, threshold=0.0)


# --------------------------------------------------------------------------------------------------
# Eq. 1: supervised contrastive loss
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["simclr", "gcl", "pcl"])
def test_contrastive_matches_loop(rule, generator):
    n, dim, tau = 6, 5, 0.1
    z = torch.randn(2 * n, dim, generator=generator, dtype=DOUBLE)
    positions = torch.rand(n, generator=generator, dtype=DOUBLE)
    partitions = torch.randint(0, 4, (n,), generator=generator)
    positives = positive_mask(rule, positions, partitions, threshold=0.3)
    got = supervised_contrastive_loss(z, positives, tau, base_temperature=tau)  # Eq. 1 as printed
    assert got.dtype == DOUBLE
    assert got.item() == pytest.approx(reference_contrastive(z, positives, tau), rel=1e-10, abs=1e-12)
    via_views = contrastive_loss(z[:n], z[n:], positions, partitions, rule, tau, 0.3, base_temperature=tau)
    assert torch.allclose(via_views, got)
    module = ContrastiveLoss(rule, temperature=tau, threshold=0.3, base_temperature=tau)
    assert torch.allclose(module(z[:n], z[n:], positions, partitions), got)


@pytest.mark.parametrize("rule", ["simclr", "gcl", "pcl"])
def test_contrastive_defaults_are_the_authors_formula(rule, generator):
    """With its defaults the loss is the authors' (supervised-contrastive reference code): Eq. 1 times
    tau / base_tau = 0.1 / 0.07."""
    n, dim, tau = 6, 5, 0.1
    z = torch.randn(2 * n, dim, generator=generator, dtype=DOUBLE)
    positions = torch.rand(n, generator=generator, dtype=DOUBLE)
    partitions = torch.randint(0, 4, (n,), generator=generator)
    positives = positive_mask(rule, positions, partitions, threshold=0.3)
    expected = reference_supcon_authors(z, positives, tau, 0.07)
    assert supervised_contrastive_loss(z, positives, tau).item() == pytest.approx(expected, rel=1e-10)
    assert contrastive_loss(z[:n], z[n:], positions, partitions, rule, tau, 0.3).item() == pytest.approx(
        expected, rel=1e-10)
    module = ContrastiveLoss.from_settings(PretrainSettings(temperature=tau, pcl_threshold=0.3), rule)
    assert module(z[:n], z[n:], positions, partitions).item() == pytest.approx(expected, rel=1e-10)
    printed = supervised_contrastive_loss(z, positives, tau, base_temperature=tau).item()
    assert expected == pytest.approx(printed * tau / 0.07, rel=1e-10)


def test_contrastive_analytic_values():
    n, tau = 3, 0.1
    identical = torch.ones(2 * n, 4, dtype=DOUBLE)
    simclr = positive_mask("simclr", torch.rand(n), None)
    # every similarity is 1: each term is log(1 / (2N - 1))
    assert supervised_contrastive_loss(identical, simclr, tau, tau).item() == pytest.approx(math.log(2 * n - 1))
    # samples orthogonal to each other, the two views of a sample identical
    basis = torch.eye(n, dtype=DOUBLE)
    z = torch.cat([basis, 2.0 * basis])  # scale must not matter (cosine)
    expected = math.log(1 + (2 * n - 2) * math.exp(-1 / tau))
    assert supervised_contrastive_loss(z, simclr, tau, tau).item() == pytest.approx(expected, rel=1e-12)
    # with every view a positive (all in one partition) the orthogonal batch is worse
    gcl = positive_mask("gcl", None, torch.zeros(n, dtype=torch.long))
    numerator_same, numerator_other = 1 / tau, 0.0
    denominator = math.log(math.exp(1 / tau) + (2 * n - 2))
    expected_gcl = -(numerator_same - denominator + (2 * n - 2) * (numerator_other - denominator)) / (2 * n - 1)
    assert supervised_contrastive_loss(z, gcl, tau, tau).item() == pytest.approx(expected_gcl, rel=1e-12)


def test_contrastive_anchors_without_positives_are_skipped(generator):
    z = torch.randn(6, 3, generator=generator, dtype=DOUBLE, requires_grad=True)
    positives = torch.zeros(6, 6, dtype=torch.bool)
    positives[0, 3] = positives[3, 0] = True
    got = supervised_contrastive_loss(z, positives, 0.5, 0.5)
    assert got.item() == pytest.approx(reference_contrastive(z.detach(), positives, 0.5), rel=1e-10)
    empty = supervised_contrastive_loss(z, torch.zeros(6, 6, dtype=torch.bool), 0.5, 0.5)
    assert empty.item() == 0.0
    (got + empty).backward()
    assert torch.isfinite(z.grad).all()


def test_contrastive_is_stable_and_runs_in_float32_under_autocast(generator):
    z = torch.randn(8, 16, generator=generator) * 1e3
    positives = positive_mask("simclr", torch.rand(4), None)
    reference = supervised_contrastive_loss(z.double(), positives, 0.01, 0.01)
    for dtype in (torch.float16, torch.bfloat16):
        low = z.to(dtype).requires_grad_()
        loss = supervised_contrastive_loss(low, positives, 0.01, 0.01)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert loss.item() == pytest.approx(reference.item(), rel=0.05, abs=0.05)
        loss.backward()
        assert torch.isfinite(low.grad.float()).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = supervised_contrastive_loss(z, positives, 0.1, 0.1)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(supervised_contrastive_loss(z, positives, 0.1, 0.1).item(), rel=1e-5)


def test_contrastive_gradcheck(generator):
    z = torch.randn(6, 4, generator=generator, dtype=DOUBLE, requires_grad=True)
    positives = positive_mask("pcl", torch.tensor([0.1, 0.2, 0.8]), None, 0.3)
    assert torch.autograd.gradcheck(lambda x: supervised_contrastive_loss(x, positives, 0.2, 0.2), (z,))


def test_contrastive_rejects_bad_arguments():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="shape"):
        supervised_contrastive_loss(torch.randn(4), torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="positives"):
        supervised_contrastive_loss(z, torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        supervised_contrastive_loss(z, torch.zeros(4, 4, dtype=torch.bool), 0.0)
    with pytest.raises(ValueError, match="z1 and z2"):
        contrastive_loss(z, torch.randn(3, 3), torch.rand(4), None)
    with pytest.raises(ValueError, match="positions"):
        contrastive_loss(z, z, torch.rand(3), None)


# --------------------------------------------------------------------------------------------------
# Eq. 2: log-space Sinkhorn
# --------------------------------------------------------------------------------------------------


def test_sinkhorn_matches_loop_reference_with_padding(generator):
    batch, m, n, alpha = 3, 5, 4, 0.7
    scores = torch.randn(batch, m, n, generator=generator, dtype=DOUBLE) * 2
    valid1 = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 1, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    valid2 = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1], [1, 0, 1, 0]], dtype=torch.bool)
    for iterations in (1, 3, 7):
        got = log_sinkhorn(scores, torch.tensor(alpha, dtype=DOUBLE), iterations, valid1, valid2)
        expected = reference_sinkhorn(scores, alpha, iterations, valid1, valid2)
        assert got.shape == (batch, m + 1, n + 1) and got.dtype == DOUBLE
        finite = torch.isfinite(expected)
        assert torch.equal(torch.isfinite(got), finite)
        assert torch.allclose(got[finite], expected[finite], rtol=1e-10, atol=1e-10)


def test_sinkhorn_marginals_after_convergence(generator):
    batch, m, n = 2, 6, 5
    scores = torch.randn(batch, m, n, generator=generator, dtype=DOUBLE)
    valid1 = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 0, 0]], dtype=torch.bool)
    valid2 = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 1, 1]], dtype=torch.bool)
    plan = log_sinkhorn(scores, 1.0, 200, valid1, valid2).exp()  # (B, M+1, N+1)
    rows, cols = plan.sum(dim=2), plan.sum(dim=1)
    for s in range(batch):
        m_s, n_s = int(valid1[s].sum()), int(valid2[s].sum())
        assert torch.allclose(rows[s, :m][valid1[s]], torch.ones(m_s, dtype=DOUBLE), atol=1e-8)
        assert torch.allclose(cols[s, :n][valid2[s]], torch.ones(n_s, dtype=DOUBLE), atol=1e-8)
        assert rows[s, m].item() == pytest.approx(n_s, abs=1e-8)  # dustbin row
        assert cols[s, n].item() == pytest.approx(m_s, abs=1e-8)  # dustbin column
        assert (rows[s, :m][~valid1[s]] == 0).all() and (cols[s, :n][~valid2[s]] == 0).all()
        assert plan[s].sum().item() == pytest.approx(m_s + n_s, abs=1e-8)
    # columns hold exactly after a single iteration (the last half-step updates them)
    one = log_sinkhorn(scores, 1.0, 1).exp()
    assert torch.allclose(one.sum(dim=1)[:, :n], torch.ones(batch, n, dtype=DOUBLE), atol=1e-12)


def test_sinkhorn_padding_invariance_with_garbage_scores(generator):
    batch, m, n = 2, 4, 3
    scores = torch.randn(batch, m, n, generator=generator, dtype=DOUBLE)
    base = log_sinkhorn(scores, 0.5, 30)
    # real keypoints go to these slots of a padded layout (6 and 7 slots); the rest is padding with
    # absurd scores
    rows = [0, 2, 3, 5]
    cols = [1, 2, 4]
    padded = torch.randn(batch, 6, 7, generator=generator, dtype=DOUBLE) * 1e4
    padded[:, 1, 0] = float("nan")
    padded[:, 4, 6] = float("inf")
    valid1 = torch.zeros(batch, 6, dtype=torch.bool)
    valid2 = torch.zeros(batch, 7, dtype=torch.bool)
    for i_real, i in enumerate(rows):
        for j_real, j in enumerate(cols):
            padded[:, i, j] = scores[:, i_real, j_real]
    valid1[:, rows] = True
    valid2[:, cols] = True
    for dtype in (DOUBLE, torch.float32):
        got = log_sinkhorn(padded.to(dtype), 0.5, 30, valid1, valid2)
        index_rows = torch.tensor(rows + [6])
        index_cols = torch.tensor(cols + [7])
        block = got[:, index_rows][:, :, index_cols].double()  # (B, M+1, N+1) the valid cells and dustbins
        if dtype == DOUBLE:
            tolerance = 1e-12
        else:
            # float32 against the float64 reference, bounded by analysis rather than tuned: each of the
            # 30 iterations adds at most a few roundings (a logsumexp over at most 8 terms, one
            # subtraction) of values below |log P| + |u| + |v| ~ 10, each within eps32 = 1.2e-7 of it;
            # a bound of 30 iterations x 10 roundings x 10 x eps32 = 3.6e-4 holds on any machine
            tolerance = 30 * 10 * 10 * torch.finfo(torch.float32).eps
        assert (block - base).abs().max().item() <= tolerance
        garbage = padded.detach().to(dtype).clone().requires_grad_()
        finite = log_sinkhorn(garbage, 0.5, 30, valid1, valid2)
        finite.masked_fill(torch.isneginf(finite), 0.0).sum().backward()
        assert torch.isfinite(garbage.grad).all()
        assert (garbage.grad[:, ~valid1[0]] == 0).all() and (garbage.grad[:, :, ~valid2[0]] == 0).all()
        invalid_rows = [i for i in range(6) if i not in rows]
        invalid_cols = [j for j in range(7) if j not in cols]
        assert torch.isneginf(got[:, invalid_rows]).all() and torch.isneginf(got[:, :, invalid_cols]).all()


def test_sinkhorn_zero_keypoints(generator):
    scores = torch.randn(3, 3, 4, generator=generator, dtype=DOUBLE, requires_grad=True)
    dustbin = torch.tensor(1.0, dtype=DOUBLE, requires_grad=True)
    valid1 = torch.tensor([[0, 0, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    valid2 = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    log_p = log_sinkhorn(scores, dustbin, 20, valid1, valid2)
    assert not torch.isnan(log_p).any()
    # m = 0 < n: the dustbin row sends mass 1 to every valid column
    assert torch.allclose(log_p[0, 3, [0, 2, 3]], torch.zeros(3, dtype=DOUBLE), atol=1e-12)
    assert torch.isneginf(log_p[0, :3]).all() and torch.isneginf(log_p[0, :, 4]).all()
    # n = 0 < m: every valid row goes to the dustbin column
    assert torch.allclose(log_p[1, [0, 1], 4], torch.zeros(2, dtype=DOUBLE), atol=1e-12)
    # m = n = 0: nothing carries mass
    assert torch.isneginf(log_p[2]).all()
    finite = log_p.masked_fill(torch.isneginf(log_p), 0.0)
    finite.sum().backward()
    assert torch.isfinite(scores.grad).all() and torch.isfinite(dustbin.grad)


def test_sinkhorn_all_padded_and_empty_shapes():
    log_p = log_sinkhorn(torch.zeros(2, 0, 3), 1.0, 5, None, torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool))
    assert log_p.shape == (2, 1, 4)
    assert torch.allclose(log_p[0, 0, :2], torch.zeros(2)) and torch.isneginf(log_p[1]).all()
    assert torch.isneginf(log_sinkhorn(torch.zeros(1, 0, 0), 1.0, 5)).all()


def test_sinkhorn_float32_under_autocast(generator):
    scores = torch.randn(2, 5, 6, generator=generator)
    expected = log_sinkhorn(scores, 1.0, 50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = log_sinkhorn(scores, torch.tensor(1.0), 50)
    assert got.dtype == torch.float32 and torch.allclose(got, expected)
    half = log_sinkhorn(scores.half(), 1.0, 50)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()


def test_sinkhorn_gradcheck(generator):
    scores = torch.randn(2, 3, 4, generator=generator, dtype=DOUBLE, requires_grad=True)
    dustbin = torch.tensor(0.8, dtype=DOUBLE, requires_grad=True)
    valid1 = torch.tensor([[1, 1, 1], [1, 0, 1]], dtype=torch.bool)
    valid2 = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)

    def finite_part(s, d):
        log_p = log_sinkhorn(s, d, 5, valid1, valid2)
        return log_p.masked_fill(torch.isneginf(log_p), 0.0)

    assert torch.autograd.gradcheck(finite_part, (scores, dustbin))


def test_sinkhorn_rejects_bad_arguments():
    with pytest.raises(ValueError, match="scores"):
        log_sinkhorn(torch.zeros(3, 4), 1.0)
    with pytest.raises(ValueError, match="iterations"):
        log_sinkhorn(torch.zeros(1, 3, 4), 1.0, 0)
    with pytest.raises(ValueError, match="valid1"):
        log_sinkhorn(torch.zeros(1, 3, 4), 1.0, 3, torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        log_sinkhorn(torch.zeros(1, 3, 4), 1.0, 3, torch.ones(1, 3))
    with pytest.raises(ValueError, match="dustbin"):
        log_sinkhorn(torch.zeros(1, 3, 4), torch.ones(2))


# --------------------------------------------------------------------------------------------------
# Eq. 2: matching loss
# --------------------------------------------------------------------------------------------------


def test_matching_loss_matches_loop_reference(generator):
    batch, m, n = 4, 6, 5
    for trial in range(5):
        match12, match21, valid1, valid2 = random_matches(batch, m, n, generator)
        scores = torch.randn(batch, m, n, generator=generator, dtype=DOUBLE) * 3
        log_p = log_sinkhorn(scores, 1.0, 10, valid1, valid2)
        for w_m, w_u, clamp in ((0.45, 1.0, -100.0), (1.0, 0.3, -2.0)):
            got = matching_loss(log_p, match12, match21, valid1, valid2, w_m, w_u, clamp)
            expected = reference_matching(log_p, match12, match21, valid1, valid2, w_m, w_u, clamp)
            assert got.item() == pytest.approx(expected, rel=1e-10, abs=1e-12), trial
            summed = matching_loss(log_p, match12, match21, valid1, valid2, w_m, w_u, clamp, normalisation="sum")
            expected = reference_matching_sum(log_p, match12, match21, valid1, valid2, w_m, w_u, clamp)
            assert summed.item() == pytest.approx(expected, rel=1e-10, abs=1e-12), trial
        # the defaults are the authors' normalisation and weights
        expected = reference_matching(log_p, match12, match21, valid1, valid2, 0.45, 1.0, -100.0)
        assert matching_loss(log_p, match12, match21, valid1, valid2).item() == pytest.approx(expected, rel=1e-10)


def test_matching_loss_weighs_the_groups_separately():
    """Per-group means: the few matched pairs weigh as much as the many dustbin terms, whatever their
    counts (one mean over all terms would drown the matched ones)."""
    k = 200
    log_p = torch.full((1, k + 1, k + 1), math.log(0.5), dtype=DOUBLE)
    log_p[0, :k, k] = math.log(0.25)  # every dustbin cell of image 1
    log_p[0, k, :k] = math.log(0.25)
    match12 = torch.full((1, k), -1)
    match21 = torch.full((1, k), -1)
    match12[0, :10] = torch.arange(10)
    match21[0, :10] = torch.arange(10)
    valid = torch.ones(1, k, dtype=torch.bool)
    got = matching_loss(log_p, match12, match21, valid, valid)
    assert got.item() == pytest.approx(0.45 * math.log(2) + 1.0 * math.log(4), rel=1e-12)
    summed = matching_loss(log_p, match12, match21, valid, valid, 1.0, 1.0, normalisation="sum")
    assert summed.item() == pytest.approx(10 * math.log(2) + 380 * math.log(4), rel=1e-12)
    with pytest.raises(ValueError, match="normalisation"):
        matching_loss(log_p, match12, match21, valid, valid, normalisation="mean")


def test_matching_loss_hand_computed_value():
    # one sample, M = N = 2: keypoint 0 <-> 0 matched, keypoint 1 of each image unmatched
    log_p = torch.log(torch.tensor([[[0.5, 0.1, 0.4], [0.2, 0.3, 0.5], [0.3, 0.6, 0.1]]], dtype=DOUBLE))
    match12 = torch.tensor([[0, -1]])
    match21 = torch.tensor([[0, -1]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    got = matching_loss(log_p, match12, match21, valid, valid, 0.45, 1.0)
    # the matched group holds log P_00 = log 0.5; the dustbin group log P_{1,dustbin} = log 0.5 and
    # log P_{dustbin,1} = log 0.6
    expected = -0.45 * math.log(0.5) - (math.log(0.5) + math.log(0.6)) / 2
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_matching_loss_touches_exactly_the_prescribed_cells():
    """Unmatched keypoints read only their dustbin cell: nothing at index -1 (see the book's page of deviations)."""
    m, n = 4, 3
    log_p = torch.full((1, m + 1, n + 1), -1.0, dtype=DOUBLE, requires_grad=True)
    match12 = torch.tensor([[2, -1, 0, 1]])  # keypoint 3's partner (1) is padded
    match21 = torch.tensor([[2, 3, 0]])
    valid1 = torch.tensor([[1, 1, 1, 1]], dtype=torch.bool)
    valid2 = torch.tensor([[1, 0, 1]], dtype=torch.bool)
    matching_loss(log_p, match12, match21, valid1, valid2).backward()
    touched = {tuple(i) for i in (log_p.grad[0] != 0).nonzero().tolist()}
    # matched (0,2), (2,0); unmatched image 1: rows 1, 3 to the dustbin column 3; image 2: none left
    assert touched == {(0, 2), (2, 0), (1, 3), (3, 3)}
    assert log_p.grad[0, 1, n - 1] == 0  # the cell index -1 would have hit


def test_matching_loss_clamps_and_handles_empty_samples():
    m = n = 3
    log_p = torch.full((3, m + 1, n + 1), float("-inf"), dtype=DOUBLE, requires_grad=True)
    match12 = torch.tensor([[0, -1, -1], [-1, -1, -1], [0, 1, 2]])
    match21 = torch.tensor([[0, -1, -1], [-1, -1, -1], [0, 1, 2]])
    valid1 = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 0, 0]], dtype=torch.bool)
    valid2 = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=torch.bool)
    loss = matching_loss(log_p, match12, match21, valid1, valid2, 0.45, 1.0, -100.0)
    # sample 0 only: one matched and one dustbin term, each clamped to -100; samples 1 and 2 have no
    # terms and count 0 in both means over the three samples
    assert loss.item() == pytest.approx((0.45 * 100 + 100) / 3)
    loss.backward()
    assert torch.isfinite(log_p.grad).all() and (log_p.grad == 0).all()  # clamped: no gradient
    none = torch.zeros(3, 3, dtype=torch.bool)
    nothing = matching_loss(log_p, match12, match21, none, none)
    assert nothing.item() == 0.0 and nothing.requires_grad


def test_matching_loss_rejects_bad_matches():
    log_p = torch.zeros(1, 3, 3)
    valid = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="disagree"):
        matching_loss(log_p, torch.tensor([[1, -1]]), torch.tensor([[-1, -1]]), valid, valid)
    with pytest.raises(ValueError, match="disagree"):
        matching_loss(log_p, torch.tensor([[1, 0]]), torch.tensor([[0, 1]]), valid, valid)
    with pytest.raises(ValueError, match=r"match12 entries must lie in \[-1, 1\]"):
        matching_loss(log_p, torch.tensor([[2, -1]]), torch.tensor([[-1, -1]]), valid, valid)
    with pytest.raises(ValueError, match="match21 entries"):
        matching_loss(log_p, torch.tensor([[-1, -1]]), torch.tensor([[-2, -1]]), valid, valid)
    with pytest.raises(ValueError, match="integer"):
        matching_loss(log_p, torch.zeros(1, 2), torch.zeros(1, 2), valid, valid)
    with pytest.raises(ValueError, match="shape"):
        matching_loss(log_p, torch.tensor([[-1, -1, -1]]), torch.tensor([[-1, -1]]), valid, valid)
    with pytest.raises(ValueError, match="valid1, valid2"):
        unmatched = torch.tensor([[-1, -1]])
        matching_loss(log_p, unmatched, unmatched, torch.ones(1, 3, dtype=torch.bool), valid)
    # mismatches involving a padded keypoint are ignored, not errors
    second_padded = torch.tensor([[1, 0]], dtype=torch.bool)
    paired1, paired2 = matched_pairs(torch.tensor([[1, -1]]), torch.tensor([[-1, -1]]), valid, second_padded)
    assert not paired1.any() and not paired2.any()
    matching_loss(log_p, torch.tensor([[1, -1]]), torch.tensor([[-1, -1]]), valid, valid, check_consistency=False)


def test_matching_loss_gradcheck(generator):
    match12, match21, valid1, valid2 = random_matches(2, 4, 3, generator)
    valid1[:, 0] = True
    log_p = (-torch.rand(2, 5, 4, generator=generator, dtype=DOUBLE) * 3 - 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: matching_loss(x, match12, match21, valid1, valid2), (log_p,))


def test_matching_module_end_to_end(generator):
    settings = PretrainSettings(sinkhorn_iterations=8, dustbin_init=0.5)
    module = MatchingLoss.from_settings(settings).double()
    assert isinstance(module.dustbin, torch.nn.Parameter) and module.dustbin.item() == 0.5
    assert module.iterations == 8 and module.matched_weight == 0.45 and module.log_clamp == -100.0
    match12, match21, valid1, valid2 = random_matches(3, 5, 5, generator)
    valid1[2] = False  # a sample without keypoints in image 1
    scores = torch.randn(3, 5, 5, generator=generator, dtype=DOUBLE, requires_grad=True)
    output = module(scores, match12, match21, valid1, valid2)
    loss, log_p = output
    reference_log_p = reference_sinkhorn(scores.detach(), 0.5, 8, valid1, valid2)
    expected = reference_matching(reference_log_p, match12, match21, valid1, valid2)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert log_p.shape == (3, 6, 6)
    loss.backward()
    assert torch.isfinite(scores.grad).all()
    assert module.dustbin.grad is not None and torch.isfinite(module.dustbin.grad)

    def end_to_end(s, d):
        return matching_loss(log_sinkhorn(s, d, 4, valid1, valid2), match12, match21, valid1, valid2)

    small = scores.detach()[:, :3, :3].clone().requires_grad_()
    match12, match21 = torch.tensor([[0, -1, 2]] * 3), torch.tensor([[0, -1, 2]] * 3)
    valid1 = torch.ones(3, 3, dtype=torch.bool)
    valid2 = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 0, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(end_to_end, (small, torch.tensor(0.5, dtype=DOUBLE, requires_grad=True)))


def test_matching_module_rejects_bad_settings():
    with pytest.raises(ValueError, match="iterations"):
        MatchingLoss(iterations=0)
    with pytest.raises(ValueError, match="log_clamp"):
        MatchingLoss(log_clamp=0.0)


# --------------------------------------------------------------------------------------------------
# Optional fourth term: local contrastive
# --------------------------------------------------------------------------------------------------


def test_local_contrastive_matches_loop_reference(generator):
    batch, m, n, dim = 3, 5, 4, 6
    for _ in range(3):
        match12, _, valid1, valid2 = random_matches(batch, m, n, generator)
        desc1 = torch.randn(batch, m, dim, generator=generator, dtype=DOUBLE)
        desc2 = torch.randn(batch, n, dim, generator=generator, dtype=DOUBLE)
        got = local_contrastive_loss(desc1, desc2, match12, valid1, valid2, 0.2, base_temperature=0.2)
        expected = reference_local_contrastive(desc1, desc2, match12, valid1, valid2, 0.2)
        assert got.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
        scaled = local_contrastive_loss(desc1, desc2, match12, valid1, valid2, 0.2)  # authors' factor
        assert scaled.item() == pytest.approx(expected * 0.2 / 0.07, rel=1e-10, abs=1e-12)


def test_local_contrastive_never_treats_unmatched_as_positive():
    # keypoint 1 of image 1 is unmatched and identical to the last keypoint of image 2: the authors'
    # index -1 write would make it a positive. Here it is only a negative of the matched anchors.
    desc1 = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]], dtype=DOUBLE)
    desc2 = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]], dtype=DOUBLE)
    match12 = torch.tensor([[0, -1]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    tau = 0.5
    got = local_contrastive_loss(desc1, desc2, match12, valid, valid, tau, tau)
    # two anchors (0 of each image), positive similarity 1, negatives similarity 0 (two of them)
    expected = math.log(1 + 2 * math.exp(-1 / tau))
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_local_contrastive_masks_and_gradients(generator):
    desc1 = torch.randn(2, 4, 3, generator=generator, dtype=DOUBLE, requires_grad=True)
    desc2 = torch.randn(2, 4, 3, generator=generator, dtype=DOUBLE, requires_grad=True)
    match12 = torch.tensor([[1, 0, -1, 3], [0, 1, 2, 3]])
    valid1 = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    valid2 = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    loss = local_contrastive_loss(desc1, desc2, match12, valid1, valid2, 0.1)
    loss.backward()
    assert torch.isfinite(desc1.grad).all() and torch.isfinite(desc2.grad).all()
    # padded keypoints and the all-padded sample get no gradient
    assert (desc1.grad[0, 3] == 0).all() and (desc2.grad[0, 2] == 0).all() and (desc1.grad[1] == 0).all()
    # garbage in padded entries changes nothing
    noisy1 = desc1.detach().clone()
    noisy1[0, 3] = 1e6
    noisy1[1] = float("nan")
    noisy1.requires_grad_()
    again = local_contrastive_loss(noisy1, desc2.detach(), match12, valid1, valid2, 0.1)
    assert again.item() == pytest.approx(loss.item(), rel=1e-12)
    again.backward()
    assert torch.allclose(noisy1.grad, desc1.grad)
    empty = local_contrastive_loss(desc1, desc2, torch.full((2, 4), -1), valid1, valid2, 0.1)
    assert empty.item() == 0.0
    inputs = (desc1.detach().requires_grad_(), desc2.detach().requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b: local_contrastive_loss(a, b, match12, valid1, valid2, 0.3), inputs)


def test_local_contrastive_all_padded_batch_has_finite_zero_gradient(generator):
    desc1 = torch.randn(2, 3, 4, generator=generator, requires_grad=True)
    desc2 = torch.randn(2, 3, 4, generator=generator, requires_grad=True)
    nothing = torch.zeros(2, 3, dtype=torch.bool)
    loss = local_contrastive_loss(desc1, desc2, torch.tensor([[0, 1, 2]] * 2), nothing, nothing)
    assert loss.item() == 0.0
    loss.backward()
    assert (desc1.grad == 0).all() and (desc2.grad == 0).all()


# --------------------------------------------------------------------------------------------------
# Eq. 3: total
# --------------------------------------------------------------------------------------------------


def test_total_loss_weights_and_logging():
    pcl = torch.tensor(2.0, requires_grad=True)
    glob = torch.tensor(3.0, requires_grad=True)
    local = torch.tensor(5.0, requires_grad=True)
    total, terms = total_loss(pcl, glob, local)
    assert total.item() == pytest.approx(2.0 + 3.0 + 0.05)
    assert set(terms) == {"pcl", "global", "local", "total"}
    assert all(not t.requires_grad and t.dtype == torch.float32 for t in terms.values())
    total.backward()
    assert local.grad.item() == pytest.approx(0.01) and pcl.grad.item() == 1.0

    extra = torch.tensor(7.0)
    total, terms = total_loss(pcl, None, None, (1.0, 0.0, 0.0), extra, 0.5)
    assert total.item() == pytest.approx(2.0 + 3.5) and set(terms) == {"pcl", "local_contrastive", "total"}
    # a given term with weight 0 is logged, not added (a NaN there cannot leak)
    total, terms = total_loss(pcl, torch.tensor(float("nan")), local, (1.0, 0.0, 1.0))
    assert total.item() == pytest.approx(7.0) and torch.isnan(terms["global"])


def test_total_loss_rejects_bad_arguments():
    one = torch.tensor(1.0)
    with pytest.raises(ValueError, match="'global' term has weight"):
        total_loss(one, None, one)
    with pytest.raises(ValueError, match="nothing to optimise"):
        total_loss(None, None, None, (0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="scalar"):
        total_loss(torch.ones(2), one, one)
    with pytest.raises(ValueError, match="weights"):
        total_loss(one, one, one, (1.0, 1.0))
    with pytest.raises(ValueError, match="finite"):
        total_loss(one, one, one, (1.0, float("nan"), 1.0))
