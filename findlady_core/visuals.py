"""The pictures of a verification, as plain data: what a dashboard draws (``findlady.visuals/1``).

Computed once, at verification time, from what re-synchronization and the integrity check
found (the N x N similarity matrices are dropped right after, so they cannot be rebuilt from
the report):

* per group, the similarity matrix (rows: reference neurons, columns: suspect neurons) before
  re-synchronization (the suspect's neurons in the order it came in) and after (the same
  values, columns in the recovered order, so a recognised copy shows a bright diagonal): the
  paper's Fig. 6. Groups above ``MAX_SIDE`` neurons are shown on ``MAX_SIDE`` evenly spaced
  reference neurons; *after* shows their matched columns, *before* the suspect's columns at
  the same positions. Values are rounded to ``DECIMALS`` places;
* per-neuron margins (``findlady_core.resync.margins``, the verdict's evidence) as histograms,
  per group and overall, on shared bin edges;
* integrity counts per unit (group or unpermuted layer);
* the watermark's bits: the key's, read before and after re-synchronization (with a key).

Nested groups (dims inside heads) are drawn on their group-local indices; the picture is the
same matrices the solver decided on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from findlady_core.integrity import IntegrityResult
from findlady_core.resync import ResyncResult, _assign, margins

FORMAT = "findlady.visuals/1"
MAX_SIDE = 256
DECIMALS = 3
BINS = 30


def sample_indices(n: int, max_side: int = MAX_SIDE) -> torch.Tensor:
    """``min(n, max_side)`` evenly spaced indices of ``range(n)``, first and last included."""
    if n <= max_side:
        return torch.arange(n)
    return torch.linspace(0, n - 1, max_side).round().long()


def _rounded(t: torch.Tensor) -> list[list[float]]:
    # numpy's round (rint of x * 10^d, divided back: a correctly rounded quotient) gives the same
    # floats as Python's round(x, d) but for values within 1e-13 of a half (none in 13M tried),
    # 16x faster than rounding one Python float at a time (1.6 s of a BERT-base job's pictures)
    # Strict JSON as it stands (no NaN/Infinity: None there), so that a service stores the
    # millions of values without walking them again (BERT-base: 4M values, 30 MB of JSON).
    a = np.round(t.detach().cpu().double().numpy(), DECIMALS)
    if not np.isfinite(a).all():
        return [[v if math.isfinite(v) else None for v in row] for row in a.tolist()]
    return a.tolist()  # type: ignore[no-any-return]


def group_matrices(s: torch.Tensor, permutation: torch.Tensor, max_side: int = MAX_SIDE) -> dict[str, Any]:
    """Before/after matrices of one group from its last similarity matrix ``s``.

    ``s`` is the matrix the solver last decided on: its columns are the suspect's neurons in the
    order the solver held them then, and its bijection ``local = _assign(s)`` took them to the
    final order. ``permutation`` is the group's final permutation (reference neuron i sits at
    the suspect's original position ``permutation[i]``); so the column holding the suspect's
    original neuron j is ``argsort(current)[j]`` with ``current = permutation[argsort(local)]``.
    """
    s = s.detach().cpu().float()
    n = s.shape[0]
    local = _assign(s)
    current = permutation.cpu()[torch.argsort(local)]  # original suspect index held by each column of s
    idx = sample_indices(n, max_side)
    rows = s.index_select(0, idx)  # only the shown entries are gathered, not two N x N copies
    return {
        "size": n,
        "indices": idx.tolist(),
        # before: column j is the suspect's original neuron j; after: column k is the suspect
        # neuron matched to reference neuron k
        "before": _rounded(rows[:, torch.argsort(current)[idx]]),
        "after": _rounded(rows[:, local[idx]]),
        "margins": margins(s, local),
    }


def histogram(values: torch.Tensor, edges: torch.Tensor) -> list[int]:
    """Counts per bin ``[edges[k], edges[k+1])``, the last bin closed."""
    if values.numel() == 0:
        return [0] * (len(edges) - 1)
    b = torch.bucketize(values.double(), edges.double(), right=True) - 1
    b = b.clamp(0, len(edges) - 2)
    return torch.bincount(b, minlength=len(edges) - 1).tolist()


def _edges(all_margins: torch.Tensor, bins: int = BINS) -> torch.Tensor:
    if all_margins.numel() == 0:
        return torch.linspace(-1.0, 1.0, bins + 1, dtype=torch.float64)
    lo, hi = float(all_margins.min()), float(all_margins.max())
    if hi - lo < 1e-6:
        lo, hi = lo - 0.05, hi + 0.05
    return torch.linspace(lo, hi, bins + 1, dtype=torch.float64)


def _bits(t: torch.Tensor) -> str:
    return "".join("1" if int(b) else "0" for b in t.flatten().tolist())


def watermark_bits(key: Any, suspect: Mapping[str, torch.Tensor], resynced: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The key's bits and those read from the suspect as submitted and re-synchronized, as 0/1 strings."""
    from findlady_core.watermark import extract_bits

    return {
        "layer": key.layer,
        "key": _bits(key.bits),
        "before": _bits(extract_bits(suspect[key.layer], key)),
        "after": _bits(extract_bits(resynced[key.layer], key)),
    }


def build(result: ResyncResult, integrity: IntegrityResult, *, key: Any = None,
          suspect: Mapping[str, torch.Tensor] | None = None, max_side: int = MAX_SIDE) -> dict[str, Any]:
    """The ``findlady.visuals/1`` document; needs ``resync(..., keep_similarities=True)``.

    ``key`` and ``suspect`` (the state dict as submitted) give the watermark's bit strips; the
    bits after re-synchronization are read from ``integrity.state_dict`` like the report's.
    """
    matrices: dict[str, dict[str, Any]] = {}
    per_margins: dict[str, torch.Tensor] = {}
    for g in result.groups:
        s = result.similarities.get(g.name)
        if s is None or g.size < 2:
            continue  # one neuron has nothing to match against
        m = group_matrices(s, g.permutation, max_side)
        per_margins[g.name] = m.pop("margins").double().cpu()
        matrices[g.name] = m
    every = torch.cat(list(per_margins.values())) if per_margins else torch.zeros(0, dtype=torch.float64)
    edges = _edges(every)
    groups = []
    for g in result.groups:
        entry: dict[str, Any] = {"name": g.name, "size": g.size, "moved": g.moved,
                                 "mean_similarity": round(g.mean_similarity, 6), "matrix": g.name in matrices}
        if g.name in per_margins:
            entry["shown"] = len(matrices[g.name]["indices"])
            entry["margin_counts"] = histogram(per_margins[g.name], edges)
        groups.append(entry)
    units = [{"name": name, **{k: v[k] for k in ("neurons", "flagged", "rescaled", "permuted") if k in v}}
             for name, v in integrity.groups.items()]
    wm = None
    if key is not None and suspect is not None:
        wm = watermark_bits(key, suspect, integrity.state_dict or result.state_dict)
    return {
        "format": FORMAT,
        "max_side": max_side,
        "decimals": DECIMALS,
        "groups": groups,
        "margins": {"edges": [round(float(e), 6) for e in edges], "counts": histogram(every, edges),
                    "neurons": int(every.numel())},
        "integrity": {"status": integrity.status, "units": units},
        "watermark": wm,
        "matrices": matrices,
    }


def default_group(doc: Mapping[str, Any]) -> str | None:
    """The group a dashboard shows first: the largest one that has a matrix."""
    with_matrix = [g for g in doc.get("groups", []) if g.get("matrix")]
    if not with_matrix:
        return None
    return max(with_matrix, key=lambda g: g["size"])["name"]


def view(doc: Mapping[str, Any], group: str | None = None) -> dict[str, Any]:
    """What one request serves: everything but the matrices, plus one group's (``group``, or
    the default). Raises ``KeyError`` for a group without a matrix."""
    name = group if group is not None else default_group(doc)
    matrices = doc.get("matrices", {})
    if name is not None and name not in matrices:
        raise KeyError(name)
    out = {k: v for k, v in doc.items() if k != "matrices"}
    out["group"] = name
    out["matrix"] = matrices[name] if name is not None else None
    return out
