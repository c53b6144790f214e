"""One group's assignment and its statistics: the maximum-similarity bijection, each
neuron's margin over its best alternative, and a per-neuron p-value (used by
``findlady_core.solver``; ``margins`` is the one definition of margin)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.special import log_ndtr


CANDIDATES_MIN_NEURONS = 1024  # below this the dense assignment costs about what building candidates does


def _assign(s: torch.Tensor, candidates: int | None = None) -> torch.Tensor:
    """Maximum-similarity bijection: ``p[i]`` = suspect position of reference neuron i.

    With ``candidates = k`` (the null, ``findlady_core.null``), a group of at least
    ``CANDIDATES_MIN_NEURONS`` neurons is solved on the sparse graph of each row's ``k``
    largest entries (``min_weight_full_bipartite_matching``), 3-4x faster than the
    dense solve on 3072 neurons; the bijection is the dense one whenever the dense optimum uses
    only such entries (on structureless weights its matched entries rank below 40 in their row
    and column: measured on every group of BERT-base's null). Without a perfect matching among
    the candidates it falls back to the dense solve."""
    arg = s.argmax(dim=1)
    n = s.shape[0]
    if torch.unique(arg).numel() == n:
        return arg.cpu()
    if candidates is not None and n >= CANDIDATES_MIN_NEURONS and candidates < n:
        p = _sparse_assign(s, candidates)
        if p is not None:
            return p
    rows, cols = linear_sum_assignment(s.detach().cpu().double().numpy(), maximize=True)
    p = torch.empty(n, dtype=torch.int64)
    p[torch.from_numpy(rows)] = torch.from_numpy(cols).long()
    return p


def _sparse_assign(s: torch.Tensor, k: int) -> torch.Tensor | None:
    """The maximum-similarity bijection among each row's ``k`` best entries, or None when they
    hold no perfect matching.

    It is the dense bijection whenever every matched entry of the dense one ranks among the
    ``k`` best of its row: the candidates then hold the dense optimum. (Columns' best entries
    are not added: taking them costs a transpose and a second top-k of the N x N matrix, as
    much as the rows' again, and they only matter where the rows' do not hold the optimum.)"""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    x = s.detach().cpu()
    n = x.shape[0]
    val, col = torch.topk(x, k, dim=1, sorted=False)  # n x k columns per row
    # costs 2 - s (positive: the sparse matrix stores no explicit zero), minimised
    weights = (2.0 - val.double()).reshape(-1).numpy()
    graph = csr_matrix((weights, col.reshape(-1).numpy(), np.arange(0, n * k + 1, k)), shape=(n, n))
    try:
        r, c = min_weight_full_bipartite_matching(graph)
    except ValueError:  # no perfect matching among the candidates
        return None
    p = torch.empty(n, dtype=torch.int64)
    p[torch.from_numpy(r).long()] = torch.from_numpy(c).long()
    return p


def margins(s: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Per reference neuron i: its matched similarity ``s[i, p[i]]`` minus the best
    alternative, the best other suspect neuron for it or the best other reference neuron for
    its match (rows: reference, columns: suspect; at least two neurons). The one definition of
    margin: resync's ``min_margin`` and ``ambiguous`` and the report's mean margin use it."""
    n = s.shape[0]
    idx = torch.arange(n, device=s.device)
    p = p.to(s.device)
    if torch.unique(p).numel() != n:  # not a bijection (the paper's argmax): top-2 per row and column
        rv, ri = s.topk(2, dim=1)
        row_alt = torch.where(ri[:, 0] == p, rv[:, 1], rv[:, 0])
        cv, ci = s.topk(2, dim=0)
        col_alt = torch.where(ci[0, p] == idx, cv[1, p], cv[0, p])
        return s[idx, p] - torch.maximum(row_alt, col_alt)
    matched = s[idx, p].clone()
    # the best alternatives are the row and column maxima once the matched entries are out of
    # the way (p is a bijection: one per row and column); two max reductions, no top-2 along
    # columns (5x slower); the matrix is restored before returning
    s[idx, p] = -math.inf
    try:
        row_alt = s.amax(dim=1)
        col_alt = s.amax(dim=0)[p]
    finally:
        s[idx, p] = matched
    return matched - torch.maximum(row_alt, col_alt)


@dataclass
class _Stats:
    matched: torch.Tensor
    margin: torch.Tensor
    log_p: torch.Tensor  # natural log of each neuron's p-value


def _stats(s: torch.Tensor, p: torch.Tensor) -> _Stats:
    """Matched similarity, margin over the best alternative, and a per-neuron p-value.

    The p-value asks how likely an unrelated neuron would stand this far above its row: the
    matched entry's z-score against the rest of the row, Bonferroni-corrected for being the
    best of N (a naive null would ignore that the assignment picks maxima).
    """
    n = s.shape[0]
    idx = torch.arange(n, device=s.device)
    p = p.to(s.device)
    matched = s[idx, p]
    if n == 1:
        return _Stats(matched.float().cpu(), torch.ones(1), torch.zeros(1, dtype=torch.float64))

    margin = margins(s, p).double().cpu()
    m = matched.double().cpu()
    row_sum = s.sum(dim=1).double().cpu()
    row_sq = torch.linalg.vector_norm(s, dim=1).double().cpu() ** 2
    mu = (row_sum - m) / (n - 1)
    var = (row_sq - m * m) / (n - 1) - mu * mu
    sd = var.clamp_min(1e-24).sqrt()
    z = ((m - mu) / sd).numpy()
    log_p = np.minimum(0.0, math.log(n) + log_ndtr(-z))
    return _Stats(m.float(), margin.float(), torch.from_numpy(log_p))
