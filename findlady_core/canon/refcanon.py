"""The reference's own duplicate and dead neurons (``findlady_core.canon.widths`` on the reference).

A reference may carry neurons that a thief can remove without changing the function: two
neurons with proportional own parameters (one of them can take both outgoing weights) and
neurons whose outgoing weights are zero. A suspect with those merged and dropped is *narrower*
than the reference; matched against the reference as it is, its neurons would be padded and
the merged neurons' consumers flagged. So, per width group where the suspect is narrower, the
reference is canonicalized first, with the suspect's rules (``merge_and_drop``: own parameters
at cosine >= ``MERGE_COSINE``, outgoing norm below ``DROP_RELATIVE`` of the median), never
below the suspect's width; the comparison (similarity, head maps, scales) runs against that
canonical reference, so no evidence comes from the redundant neurons.

The re-synchronized suspect is then expanded back to the reference's shapes, function-preserving:
a reference neuron merged away gets a copy of the suspect neuron matched to its cluster's head
(own parameters times the cluster's factor ``c``) and the reference's outgoing weights, which the
head gives up (``head -= c * copy``: the sum stays the suspect's, and all of any difference stays
on the head); a dead reference neuron gets the reference's own parameters and zero outgoing
weights (it contributes nothing whatever it holds). Integrity and the watermark read that at the
reference's shapes. In the permutations those positions point past the suspect's width
(``kept``: ``-1``), like padding. The reference's merges and drops are listed as transforms with
``"side": "reference"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from findlady_core.canon.widths import _blocks, _unblocks, merge_and_drop, resized_spec, suspect_widths, width_groups
from findlady_core.resync import ResyncResult
from findlady_core.spec import Spec, is_statistic

StateDict = Mapping[str, torch.Tensor]


@dataclass
class ReferenceCanon:
    """The canonical reference, its spec, and per changed group the reference position of each
    canonical neuron (``kept``) and of each merged-away copy (``copies``: position -> (head, c))."""

    reference: dict[str, torch.Tensor]
    spec: Spec
    kept: dict[str, list[int]] = field(default_factory=dict)
    copies: dict[str, dict[int, tuple[int, float]]] = field(default_factory=dict)
    dead: dict[str, list[int]] = field(default_factory=dict)
    transforms: list[dict[str, Any]] = field(default_factory=list)


def canonical_reference(reference: StateDict, suspect: StateDict, spec: Spec) -> ReferenceCanon | None:
    """None unless some width group of the suspect is narrower than the reference's and the
    reference has duplicate or dead neurons there (module docstring)."""
    shapes = {k: v.shape for k, v in reference.items()}
    try:
        widths = suspect_widths(spec, shapes, {k: v.shape for k, v in suspect.items()})
    except ValueError:
        return None  # resync refuses it with the reason
    narrower = {g: n for g, n in widths.items() if n < spec.group(g).size}
    if not narrower:
        return None
    sd = dict(reference)
    rc = ReferenceCanon(sd, spec)
    for g in reversed(width_groups(spec, shapes)):  # consumers first, as for the suspect
        if g.name not in narrower:
            continue
        c = merge_and_drop(sd, g, g.size, target=narrower[g.name])
        if len(c.kept) == g.size:
            continue
        rc.kept[g.name] = c.kept
        rc.copies[g.name] = {}
        rc.dead[g.name] = []
        for t in c.transforms:
            t["side"] = "reference"
            if t["kind"] == "merge":
                head = t["neurons"][0]
                for j, f in zip(t["neurons"][1:], t["factors"][1:]):
                    rc.copies[g.name][j] = (head, f)
            else:
                rc.dead[g.name] += t["neurons"]
        rc.transforms += c.transforms
    if not rc.kept:
        return None
    rc.spec = resized_spec(spec, {name: len(k) for name, k in rc.kept.items()})
    return rc


def expand(r: ResyncResult, rc: ReferenceCanon, reference: StateDict, spec: Spec) -> ResyncResult:
    """``r`` (against the canonical reference) at the reference's shapes (module docstring)."""
    sd = dict(r.state_dict)
    by_name = {g.name: g for g in r.groups}
    for name, kept in rc.kept.items():
        g, n, m = spec.group(name), spec.group(name).size, len(kept)
        pos = {ref_pos: k for k, ref_pos in enumerate(kept)}
        # a copy whose head was dropped too (a clique of the reference's own): dead like its head
        copies = {j: hf for j, hf in rc.copies[name].items() if hf[0] in pos}
        for mem in g.members:
            canon = _blocks(sd[mem.tensor], mem, m).double()
            ref = _blocks(reference[mem.tensor], mem, n).double()
            own = mem.is_out or is_statistic(mem.tensor)
            out = torch.zeros_like(ref)
            for i in range(n):
                if i in pos:
                    out[i] = canon[pos[i]]
                elif i in copies:
                    head, f = copies[i]
                    out[i] = canon[pos[head]] * f if own else ref[i]
                elif own:
                    out[i] = ref[i]  # a dead neuron: its incoming parameters do not matter
            if not own:
                for j, (head, f) in copies.items():
                    out[head] -= f * out[j]
            sd[mem.tensor] = _unblocks(out.to(sd[mem.tensor].dtype), mem)
        p = r.permutations[name]
        full = torch.empty(n, dtype=torch.int64)
        extra = iter(range(m, n))
        for i in range(n):
            full[i] = int(p[pos[i]]) if i in pos else next(extra)
        r.permutations[name] = full
        if name in by_name:
            gr = by_name[name]
            gr.size, gr.permutation = n, full
            gr.moved = int((full != torch.arange(n)).sum())
        # kept[k]: the suspect file position of canonical suspect neuron k; those past m are virtual
        r.kept[name] = list(r.kept.get(name, range(m))) + [-1] * (n - m)
    r.state_dict = sd
    r.transforms = rc.transforms + r.transforms
    return r
