"""Invertible maps inside attention heads, found and undone (``findlady_core.canon.attention``
says where the heads sit and which maps are symmetries).

Attention reads q and k only through ``q^T k`` (after rotary, where the model has it) and v and
o only through ``W_o v``, so ``W_q -> A W_q, W_k -> A^-T W_k`` and ``W_v -> B W_v,
W_o -> W_o B^-1`` (biases with their weights) keep the function: ``A`` any invertible map
without rotary embeddings, a 2x2 rotation-scaling per frequency pair with them; under
grouped-query attention one ``A`` per kv head (shared by its query heads) and one ``B`` per kv
head. The linear functionality equivalence attack (Li & Wang, IEEE TIFS 2023) uses them to hide
a copy. Per layer, after ``resync`` aligned the residual stream:

1. heads are matched on what the maps cannot change: per query head ``W_q^T W_k`` and
   ``W_o W_v`` (biases as one more input column; sketched with a fixed random projection when
   the model is wide), kv heads by a linear assignment of their query heads' best matching;
2. per matched kv head ``A`` is fit on q by least squares (``A q_ref = q_sus``) and checked on
   k, evidence the fit never saw: the residual ``||A^-T k_ref - k_sus|| / ||k_sus||``; ``B``
   is fit on v and checked on o the same way;
3. a map is undone only when its held-out residual is at most ``HEAD_MAP_RESIDUAL``,
   calibrated on unrelated heads (docs/obfuscation.md) and clearly below that of no map.

The fitted tensors (q and v of an undone layer) are then left out of the similarity evidence.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment

from findlady_core.canon.attention import AttentionLayer, attention_layers
from findlady_core.spec import Spec

__all__ = ["HEAD_MAP_RESIDUAL", "attention_layers", "fit_map", "match_heads", "undo_head_maps"]

HEAD_MAP_RESIDUAL = 0.5
"""Held-out relative residual up to which a fitted head map is undone (docs/obfuscation.md:
unrelated heads give 0.87 and more, a transformed copy with noise 0.1 about 0.15)."""
IDENTITY_GAIN = 0.5  # a map is a transform only when it halves the held-out residual of no map
SKETCH = 256  # invariants wider than this are compared through a fixed random projection


def fit_map(xr: torch.Tensor, xs: torch.Tensor, kind: str, rotary_dim: int | None = None) -> torch.Tensor:
    """Least-squares ``M`` with ``M xr = xs`` (``head_dim x N`` each): any matrix, or for
    ``rotary`` a rotation-scaling ``[[a, -b], [b, a]]`` on each pair ``(i, i + rotary_dim / 2)``
    of the leading ``rotary_dim`` dims (default: all) and any matrix on the dims after them."""
    if kind != "rotary":
        return torch.linalg.lstsq(xr.T, xs.T).solution.T
    r = xr.shape[0] if rotary_dim is None else rotary_dim
    h = r // 2
    ri, rj, si, sj = xr[:h], xr[h:r], xs[:h], xs[h:r]
    den = (ri.square().sum(1) + rj.square().sum(1)).clamp_min(1e-300)
    a = ((ri * si).sum(1) + (rj * sj).sum(1)) / den
    b = ((ri * sj).sum(1) - (rj * si).sum(1)) / den
    rot = torch.cat([torch.cat([torch.diag(a), -torch.diag(b)], 1), torch.cat([torch.diag(b), torch.diag(a)], 1)], 0)
    if r == xr.shape[0]:
        return rot
    return torch.block_diag(rot, fit_map(xr[r:], xs[r:], "general"))


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm().clamp_min(1e-300))


@dataclass
class SideFit:
    """One fitted map (``qk``: ``A``; ``vo``: ``B``) of kv head ``g`` and its held-out residuals."""

    side: str
    g: int
    map: torch.Tensor
    residual: float
    identity: float  # the same held-out residual with no map at all

    def takes(self, threshold: float) -> bool:
        """The map passes on held-out evidence and explains it clearly better than no map (a
        noisy copy without maps gets a fitted map near I that explains nothing more)."""
        return self.residual <= threshold and self.residual < IDENTITY_GAIN * self.identity


def _fit_side(ref: Mapping[str, torch.Tensor], sus: Mapping[str, torch.Tensor], L: AttentionLayer, side: str,
              g: int) -> SideFit:
    heads = L.query_heads(g)
    if side == "qk":  # fit on q (all query heads sharing the map), check A^-T on k
        xr, xs = (torch.cat([L.q_rows(sd, h) for h in heads], 1) for sd in (ref, sus))
        yr, ys = L.k_rows(ref, g), L.k_rows(sus, g)
        kind = L.qk
    else:  # fit on v, check B^-T on the output rows of every query head reading it
        xr, xs = L.v_rows(ref, g), L.v_rows(sus, g)
        yr, ys = (torch.cat([L.o_rows(sd, h) for h in heads], 1) for sd in (ref, sus))
        kind = "general"
    m = fit_map(xr, xs, kind, L.rotary_dim or None)
    try:
        res = _rel(torch.linalg.solve(m.T, yr), ys)  # M^-T y_ref
    except RuntimeError:  # singular fit: nothing this map could explain
        res = float("inf")
    return SideFit(side, g, m, res, _rel(yr, ys))


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-300)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return a @ b.T


_PROJECTIONS: dict[int, torch.Tensor] = {}


def _projection(d: int) -> torch.Tensor:
    """The fixed random projection of ``d``-wide invariants (seeded by ``d``: the same for
    both models), float32: the invariants only rank heads against each other."""
    p = _PROJECTIONS.get(d)
    if p is None:
        g = torch.Generator().manual_seed(d)
        p = _PROJECTIONS[d] = torch.randn(d, SKETCH, generator=g, dtype=torch.float64).float()
    return p


def _invariants(sd: Mapping[str, torch.Tensor], L: AttentionLayer) -> tuple[torch.Tensor, torch.Tensor]:
    def heads(rows: Callable[[Mapping[str, torch.Tensor], int], torch.Tensor], count: int) -> tuple[torch.Tensor, ...]:
        parts = [rows(sd, h) for h in range(count)]
        x = torch.cat(parts)
        if x.shape[1] > SKETCH:  # every head's rows in one product (per head: 1,152 small ones on BERT-base)
            x = (x.float() @ _projection(x.shape[1])).double()
        return x.split(parts[0].shape[0])

    n_q = L.kv_heads * L.group_size
    k, v, o = heads(L.k_rows, L.kv_heads), heads(L.v_rows, L.kv_heads), heads(L.o_rows, n_q)
    q = heads(L.q_rows, n_q) if L.qk != "pinned" else None  # under rotary q^T k is not the score, yet still unchanged by the maps
    qk, ov = [], []
    for g in range(L.kv_heads):
        for h in L.query_heads(g):
            if q is not None:
                qk.append((q[h].T @ k[g]).flatten())
            ov.append((o[h].T @ v[g]).flatten())
    return (torch.stack(qk) if qk else torch.empty(0)), torch.stack(ov)


def match_heads(ref: Mapping[str, torch.Tensor], sus: Mapping[str, torch.Tensor], L: AttentionLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p_kv, p_q)``: reference kv head g is suspect kv head ``p_kv[g]``, and reference query
    head i of it the suspect's query head ``p_q[g, i]`` of that kv head, on invariants of the maps."""
    (qr, orr), (qs, os_) = _invariants(ref, L), _invariants(sus, L)
    s = _cos(orr, os_)
    if qr.numel():
        s = (s + _cos(qr, qs)) / 2
    G, n = L.group_size, L.kv_heads
    within = torch.zeros(n, n, G, dtype=torch.int64)
    score = torch.zeros(n, n, dtype=torch.float64)
    for g in range(n):
        for h in range(n):
            block = s[g * G:(g + 1) * G, h * G:(h + 1) * G]
            if L.query_groups[h] is None:  # the spec cannot move query heads inside this kv head
                within[g, h] = torch.arange(G)
                score[g, h] = float(block.diagonal().sum())
                continue
            rows, cols = linear_sum_assignment(block.numpy(), maximize=True)
            within[g, h, torch.from_numpy(rows)] = torch.from_numpy(cols).long()
            score[g, h] = float(block[rows, cols].sum())
    rows, cols = linear_sum_assignment(score.numpy(), maximize=True)
    p_kv = torch.empty(n, dtype=torch.int64)
    p_kv[torch.from_numpy(rows)] = torch.from_numpy(cols).long()
    p_q = torch.stack([within[g, int(p_kv[g])] for g in range(n)])
    return p_kv, p_q


def _moved(sus: Mapping[str, torch.Tensor], L: AttentionLayer, p_kv: torch.Tensor, p_q: torch.Tensor) -> dict[str, torch.Tensor]:
    """Clones of the layer's tensors with the heads moved to the reference's order."""
    src = {t: sus[t].double() for t in L.tensors}
    new = {t: x.clone() for t, x in src.items()}
    G = L.group_size
    for g in range(L.kv_heads):
        j = int(p_kv[g])
        for s in (L.k, L.v, L.k_bias, L.v_bias):
            if s is not None:
                s.put(new, g, s.rows(src, j))
        for i in range(G):
            for s in (L.q, L.q_bias, L.o):
                if s is not None:
                    s.put(new, g * G + i, s.rows(src, j * G + int(p_q[g, i])))
    return new


def undo_head_maps(
    reference: Mapping[str, torch.Tensor], resynced: Mapping[str, torch.Tensor], spec: Spec,
    threshold: float = HEAD_MAP_RESIDUAL,
) -> tuple[MutableMapping[str, torch.Tensor], list[dict[str, Any]], dict[str, torch.Tensor], set[str]]:
    """On a suspect already in reference order (``resync``'s state dict): the state dict with
    accepted maps undone, their transforms, the head permutations to apply per group (kv heads
    and query heads inside them, on top of ``resync``'s), and the tensors a fit used (to leave
    out of the evidence)."""
    out: MutableMapping[str, torch.Tensor] = ChainMap({}, resynced)  # changed tensors over the rest, unread
    transforms: list[dict[str, Any]] = []
    head_perms: dict[str, torch.Tensor] = {}
    fitted: set[str] = set()
    for L in attention_layers(spec):
        # read once per layer: ``out`` may be lazy (lazy.PermutedStateDict re-indexes a whole
        # tensor per read), and matching and fitting read each head's block of every tensor
        layer = {t: out[t] for t in L.tensors}
        p_kv, p_q = match_heads(reference, layer, L)
        new = _moved(layer, L, p_kv, p_q)
        sides = ("vo",) if L.qk == "pinned" else ("qk", "vo")
        fits = [_fit_side(reference, new, L, side, g) for g in range(L.kv_heads) for side in sides]
        taken = [f for f in fits if f.takes(threshold)]
        if not taken:
            continue  # nothing explained: leave this layer to the permutation solver
        for f in taken:
            if f.side == "qk":  # undo: q -> A^-1 q, k -> A^T k
                L.map_qk(new, f.g, torch.linalg.inv(f.map))
                fitted |= {s.tensor for s in (L.q, L.q_bias) if s is not None}
            else:
                L.map_vo(new, f.g, torch.linalg.inv(f.map))
                fitted |= {s.tensor for s in (L.v, L.v_bias) if s is not None}
            what = ("q -> A q, k -> A^-T k" + (" (rotation-scaling per rotary pair)" if L.qk == "rotary" else "")
                    if f.side == "qk" else "v -> B v, o -> o B^-1")
            transforms.append({"kind": "head_map", "group": f"{L.heads_group}[{f.g}].{f.side}", "neurons": [f.g],
                               "suspect_head": int(p_kv[f.g]),
                               "query_heads": [int(x) for x in p_q[f.g]] if L.group_size > 1 else None,
                               "map": what, "residual": f.residual, "function_preserving": True})
        for t in L.tensors:
            out[t] = new[t].to(resynced[t].dtype)
        head_perms[L.heads_group] = p_kv
        for g, name in enumerate(L.query_groups):
            if name is not None:
                head_perms[name] = p_q[g]
    return out, transforms, head_perms, fitted
