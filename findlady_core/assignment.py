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


def _assign(s: torch.Tensor) -> torch.Tensor:
    """Maximum-similarity bijection: ``p[i]`` = suspect position of reference neuron i."""
    arg = s.argmax(dim=1)
    if torch.unique(arg).numel() == s.shape[0]:
        return arg.cpu()
    rows, cols = linear_sum_assignment(s.detach().cpu().double().numpy(), maximize=True)
    p = torch.empty(s.shape[0], dtype=torch.int64)
    p[torch.from_numpy(rows)] = torch.from_numpy(cols).long()
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
