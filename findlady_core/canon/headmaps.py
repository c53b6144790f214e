"""Invertible maps inside attention heads, found and undone (no rotary embeddings, no GQA).

Attention reads q and k only through ``q^T k`` and v and o only through ``W_o v``, so per head
``W_q -> A W_q, W_k -> A^-T W_k`` and ``W_v -> B W_v, W_o -> W_o B^-1`` (biases with their
weights) keep the function for any invertible ``A`` and ``B``: a permutation of the dims
inside a head is one special case. The linear functionality equivalence attack (Li & Wang,
IEEE TIFS 2023) uses them to hide a copy. Per layer, after ``resync`` aligned the residual
stream:

1. heads are matched on what the maps cannot change: ``W_q^T W_k`` and ``W_o W_v`` (with the
   biases as one more input column), a linear assignment on their cosines;
2. per matched head ``A`` is fit on q by least squares (``A W_q,ref = W_q,sus``) and checked on
   k, evidence the fit never saw: the residual ``||A^-T W_k,ref - W_k,sus|| / ||W_k,sus||``;
   ``B`` is fit on v and checked on o the same way;
3. a map is undone only when its held-out residual is at most ``HEAD_MAP_RESIDUAL``,
   calibrated on unrelated heads (docs/obfuscation.md): a fit alone makes unrelated weights
   look alike, the held-out side does not follow.

The fitted tensors (q and v of an undone layer) are then left out of the similarity evidence.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment

from findlady_core.spec import Spec

HEAD_MAP_RESIDUAL = 0.5
"""Held-out relative residual up to which a fitted head map is undone (docs/obfuscation.md:
unrelated heads give 0.87 and more, a transformed copy with noise 0.1 about 0.15)."""
IDENTITY_GAIN = 0.5  # a map is a transform only when it halves the held-out residual of no map


@dataclass(frozen=True)
class AttentionLayer:
    """The tensors of one attention layer, from its heads group (q, k, v rows in blocks of
    ``head_dim``, the output projection's columns)."""

    heads_group: str
    dims_groups: tuple[str, ...]
    heads: int
    head_dim: int
    q: str
    k: str
    v: str
    o: str
    q_bias: str | None
    k_bias: str | None
    v_bias: str | None

    @property
    def tensors(self) -> list[str]:
        return [t for t in (self.q, self.k, self.v, self.o, self.q_bias, self.k_bias, self.v_bias) if t]


def attention_layers(spec: Spec) -> list[AttentionLayer]:
    """Heads groups shaped like the BERT catalog's: three row-block weights (q, k, v, in that
    order), optional row-block biases, one column-block output weight."""
    out = []
    for g in spec.groups:
        blocks = [m for m in g.members if m.block > 1]
        if len(blocks) != len(g.members) or len({m.block for m in blocks}) != 1:
            continue
        weights = [m.tensor for m in blocks if m.axis == 0 and not m.tensor.endswith(".bias")]
        biases = [m.tensor for m in blocks if m.axis == 0 and m.tensor.endswith(".bias")]
        outs = [m.tensor for m in blocks if m.axis == 1]
        if len(weights) != 3 or len(outs) != 1 or len(biases) not in (0, 3):
            continue
        tensors = set(weights) | set(biases) | set(outs)
        dims = tuple(h.name for h in spec.groups
                     if h is not g and all(m.block == 1 and m.tensor in tensors for m in h.members))
        b = biases or [None, None, None]
        out.append(AttentionLayer(g.name, dims, g.size, blocks[0].block, *weights, outs[0], *b))
    return out


def _aug(sd: Mapping[str, torch.Tensor], w: str, b: str | None, rows: slice) -> torch.Tensor:
    x = sd[w][rows].double()
    if b:
        x = torch.cat([x, sd[b][rows].double()[:, None]], 1)
    return x


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-300)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return a @ b.T


@dataclass
class HeadFit:
    suspect_head: int
    a: torch.Tensor
    b: torch.Tensor
    residual_k: float
    residual_o: float
    identity_k: float  # the same held-out residual with no map at all
    identity_o: float

    def takes(self, side: str, threshold: float) -> bool:
        """The map passes on held-out evidence and explains it clearly better than no map (a
        noisy copy without maps gets a fitted A near I that explains nothing more)."""
        res, ident = (self.residual_k, self.identity_k) if side == "qk" else (self.residual_o, self.identity_o)
        return res <= threshold and res < IDENTITY_GAIN * ident


def _fit(ref: Mapping[str, torch.Tensor], sus: Mapping[str, torch.Tensor], L: AttentionLayer, i: int, j: int) -> HeadFit:
    ri = slice(i * L.head_dim, (i + 1) * L.head_dim)
    sj = slice(j * L.head_dim, (j + 1) * L.head_dim)
    qr, qs = _aug(ref, L.q, L.q_bias, ri), _aug(sus, L.q, L.q_bias, sj)
    kr, ks = _aug(ref, L.k, L.k_bias, ri), _aug(sus, L.k, L.k_bias, sj)
    vr, vs = _aug(ref, L.v, L.v_bias, ri), _aug(sus, L.v, L.v_bias, sj)
    o_r, o_s = ref[L.o][:, ri].double(), sus[L.o][:, sj].double()
    a = torch.linalg.lstsq(qr.T, qs.T).solution.T  # A q_ref = q_sus
    b = torch.linalg.lstsq(vr.T, vs.T).solution.T  # B v_ref = v_sus
    try:
        res_k = float((torch.linalg.solve(a.T, kr) - ks).norm() / ks.norm().clamp_min(1e-300))  # A^-T k_ref
        res_o = float((torch.linalg.solve(b.T, o_r.T).T - o_s).norm() / o_s.norm().clamp_min(1e-300))  # o_ref B^-1
    except RuntimeError:  # singular fit: nothing this map could explain
        res_k = res_o = float("inf")
    id_k = float((kr - ks).norm() / ks.norm().clamp_min(1e-300))
    id_o = float((o_r - o_s).norm() / o_s.norm().clamp_min(1e-300))
    return HeadFit(j, a, b, res_k, res_o, id_k, id_o)


def match_heads(ref: Mapping[str, torch.Tensor], sus: Mapping[str, torch.Tensor], L: AttentionLayer) -> torch.Tensor:
    """``p[i]``: the suspect head of reference head i, on invariants of the in-head maps."""
    def invariants(sd: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        qk, ov = [], []
        for h in range(L.heads):
            rows = slice(h * L.head_dim, (h + 1) * L.head_dim)
            qk.append((_aug(sd, L.q, L.q_bias, rows).T @ _aug(sd, L.k, L.k_bias, rows)).flatten())
            ov.append((sd[L.o][:, rows].double() @ _aug(sd, L.v, L.v_bias, rows)).flatten())
        return torch.stack(qk), torch.stack(ov)

    (qr, orr), (qs, os_) = invariants(ref), invariants(sus)
    s = (_cos(qr, qs) + _cos(orr, os_)) / 2
    rows, cols = linear_sum_assignment(s.numpy(), maximize=True)
    p = torch.empty(L.heads, dtype=torch.int64)
    p[torch.from_numpy(rows)] = torch.from_numpy(cols).long()
    return p


def undo_head_maps(
    reference: Mapping[str, torch.Tensor], resynced: Mapping[str, torch.Tensor], spec: Spec,
    threshold: float = HEAD_MAP_RESIDUAL,
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], dict[str, torch.Tensor], set[str]]:
    """On a suspect already in reference order (``resync``'s state dict): the state dict with
    accepted maps undone, their transforms, the head permutation applied per heads group (on
    top of ``resync``'s), and the tensors a fit used (to leave out of the evidence)."""
    out = dict(resynced)
    transforms: list[dict[str, Any]] = []
    head_perms: dict[str, torch.Tensor] = {}
    fitted: set[str] = set()
    for L in attention_layers(spec):
        p = match_heads(reference, out, L)
        fits = [_fit(reference, out, L, i, int(p[i])) for i in range(L.heads)]
        if not any(f.takes("qk", threshold) or f.takes("vo", threshold) for f in fits):
            continue  # nothing explained: leave this layer to the permutation solver
        sus = {t: out[t].double() for t in L.tensors}
        new = {t: x.clone() for t, x in sus.items()}
        moved = False
        for i, f in enumerate(fits):
            ri = slice(i * L.head_dim, (i + 1) * L.head_dim)
            sj = slice(f.suspect_head * L.head_dim, (f.suspect_head + 1) * L.head_dim)
            for t in L.tensors:  # the head's block moves to reference head i (maps undone below)
                if t == L.o:
                    new[t][:, ri] = sus[t][:, sj]
                else:
                    new[t][ri] = sus[t][sj]
            if f.takes("qk", threshold):
                new[L.q][ri] = torch.linalg.solve(f.a, new[L.q][ri])
                new[L.k][ri] = f.a.T @ new[L.k][ri]
                if L.q_bias:
                    new[L.q_bias][ri] = torch.linalg.solve(f.a, new[L.q_bias][ri])
                    new[L.k_bias][ri] = f.a.T @ new[L.k_bias][ri]
                transforms.append({"kind": "head_map", "group": f"{L.heads_group}[{i}].qk", "neurons": [i],
                                   "suspect_head": f.suspect_head, "map": "q -> A q, k -> A^-T k",
                                   "residual": f.residual_k, "function_preserving": True})
                fitted |= {L.q} | ({L.q_bias} if L.q_bias else set())
                moved = True
            if f.takes("vo", threshold):
                new[L.v][ri] = torch.linalg.solve(f.b, new[L.v][ri])
                if L.v_bias:
                    new[L.v_bias][ri] = torch.linalg.solve(f.b, new[L.v_bias][ri])
                new[L.o][:, ri] = new[L.o][:, ri] @ f.b
                transforms.append({"kind": "head_map", "group": f"{L.heads_group}[{i}].vo", "neurons": [i],
                                   "suspect_head": f.suspect_head, "map": "v -> B v, o -> o B^-1",
                                   "residual": f.residual_o, "function_preserving": True})
                fitted |= {L.v} | ({L.v_bias} if L.v_bias else set())
                moved = True
        if not moved and torch.equal(p, torch.arange(L.heads)):
            continue
        for t in L.tensors:
            out[t] = new[t].to(resynced[t].dtype)
        head_perms[L.heads_group] = p
    return out, transforms, head_perms, fitted
