"""Bring a suspect of another width to the reference's shapes (``findlady_core.canon.widths``).

``fit_widths`` merges and drops in every width group of the suspect that is wider than the
reference's, never below the reference's width (a suspect of the reference's width is left
alone: in a pruned model two sparse rows may be proportional, and a pruned neuron keeps its
place), then selects or pads to the reference's width with a rectangular assignment.
``resync`` calls it before anything else; on a suspect of the reference's shapes without
duplicate or silent neurons it changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from findlady_core.canon.widths import merge_and_drop, resize, resized_spec, suspect_widths, width_groups
from findlady_core.compat import IncompatibleError
from findlady_core.spec import Spec

MAX_ROUNDS = 4


@dataclass
class WidthFit:
    """``kept[group][k]``: the suspect file's position of canonical neuron k (``-1``: padding)."""

    kept: dict[str, list[int]] = field(default_factory=dict)
    transforms: list[dict[str, Any]] = field(default_factory=list)

    @property
    def real_changes(self) -> list[dict[str, Any]]:
        return [t for t in self.transforms if not t.get("function_preserving", True)]


def fit_widths(
    reference: Mapping[str, torch.Tensor], suspect: Mapping[str, torch.Tensor], spec: Spec, *,
    device: str = "cpu", ignore: Iterable[tuple[str, int]] = (),
) -> tuple[dict[str, torch.Tensor], WidthFit]:
    ref_shapes = {k: v.shape for k, v in reference.items()}
    try:
        widths = suspect_widths(spec, ref_shapes, {k: v.shape for k, v in suspect.items()})
    except ValueError as e:
        raise IncompatibleError("shape_mismatch", f"suspect: {e}") from None
    sd = dict(suspect)
    fit = WidthFit()
    groups = width_groups(spec, ref_shapes)
    kept = {g.name: list(range(widths.get(g.name, g.size))) for g in groups}
    # consumers first, then again until nothing changes: a dummy of one layer is also an input
    # of the next layer's dummies, and its outgoing weights cancel only once those are gone
    for _ in range(MAX_ROUNDS):
        changed = False
        for g in reversed(groups):
            if len(kept[g.name]) <= g.size:
                continue  # the reference's width (or less): nothing to merge away; a pruned neuron keeps its place
            c = merge_and_drop(sd, g, len(kept[g.name]), target=g.size)
            for t in c.transforms:
                t["neurons"] = [kept[g.name][i] for i in t["neurons"]]  # positions in the suspect file
            fit.transforms += c.transforms
            if len(c.kept) != len(kept[g.name]):
                kept[g.name] = [kept[g.name][i] for i in c.kept]
                changed = True
        if not changed:
            break
    for g in groups:
        if len(kept[g.name]) != g.size or g.name in widths or kept[g.name] != list(range(g.size)):
            fit.kept[g.name] = kept[g.name]
    sizes = {name: len(k) for name, k in fit.kept.items() if len(k) != spec.group(name).size}
    wider = {name: n for name, n in sizes.items() if n > spec.group(name).size}
    if wider:
        sd = _select(reference, sd, spec, wider, fit, device, ignore)
    for name, n in sizes.items():
        g = spec.group(name)
        if n < g.size:  # narrower: zero neurons where the reference has more
            sd = resize(sd, g, n, list(range(n)) + [-1] * (g.size - n))
            fit.kept[name] = fit.kept[name] + [-1] * (g.size - n)
            fit.transforms.append({"kind": "pad", "group": name, "neurons": list(range(n, g.size)), "residual": None,
                                   "function_preserving": False})
    return sd, fit


def _select(
    reference: Mapping[str, torch.Tensor], sd: dict[str, torch.Tensor], spec: Spec, wider: Mapping[str, int],
    fit: WidthFit, device: str, ignore: Iterable[tuple[str, int]],
) -> dict[str, torch.Tensor]:
    """Keep, per wider group, the suspect neurons a rectangular assignment gives to reference
    neurons: the reference is padded with zero neurons (similarity 0 to anything), the solver
    runs at the suspect's width, and the neurons matched to padding are dropped."""
    from findlady_core.resync import resync

    padded = dict(reference)
    for name, n in wider.items():
        g = spec.group(name)
        padded = resize(padded, g, g.size, list(range(g.size)) + [-1] * (n - g.size))
    r = resync(padded, sd, resized_spec(spec, wider), device=device, ignore=ignore)
    for name, n in wider.items():
        g = spec.group(name)
        chosen = sorted(int(i) for i in r.permutations[name][: g.size])
        dropped = sorted(set(range(n)) - set(chosen))
        sd = resize(sd, g, n, chosen)
        kept = fit.kept[name]
        fit.kept[name] = [kept[i] for i in chosen]
        fit.transforms.append({"kind": "drop", "group": name, "neurons": [kept[i] for i in dropped],
                               "residual": None, "function_preserving": False,
                               "why": "no reference neuron left to match (they carry weight: a real change)"})
    return sd
