"""Re-synchronization: put a suspect's permuted neurons back in the reference order.

The paper's Algorithm 1 matches one layer's neurons by the cosine similarity of their weights
and takes a greedy argmax. Here every group of a spec is solved at once, as a bijection:

1. **Order.** Groups are resolved one at a time, always the one with the most *aligned*
   evidence: slices whose other axes are unpermuted (a network's input, an embedding's
   vocabulary) or already resolved. Nested groups wait for their outer group.
2. **Invariant features.** A slice axis still held by an unresolved group is reduced by its
   mean and its (centred) mean square, which no permutation of that axis can change; an
   untouched copy then still has cosine 1 on its true pairs.
3. **Assignment.** Similarity is the dimension-weighted mean of per-member cosines (so a
   function-preserving rescale of a neuron keeps similarity 1). The greedy row argmax is kept
   when it is already a bijection; otherwise ``scipy.optimize.linear_sum_assignment``.
4. **Refinement.** Groups solved on partial evidence, and neighbours of any group that moved,
   are solved again with everything aligned until nothing changes.

``AssignmentSolver`` (``findlady_core.solver``) implements these steps; ``method="paper"`` is the
paper's Algorithm 1, kept for comparison. Permutations follow the one convention of
``findlady_core.permute``: ``resynced = suspect.index_select(axis, p)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from scipy.special import log_ndtr

from findlady_core.canon.fit import WidthFit, fit_widths
from findlady_core.compat import check_compatible
from findlady_core.errors import InputError
from findlady_core.lazy import PermutedStateDict
from findlady_core.progress import Progress, as_callback, tick
from findlady_core.solver import STRONG_EVIDENCE, AssignmentSolver, Work, _assign, margins, paper_solver
from findlady_core.spec import Group, Spec

AMBIGUOUS_MARGIN = 0.01
"""A neuron whose matched similarity beats its best alternative by less than this is ambiguous."""

METHODS = ("findlady", "paper")
"""``findlady``: the whole-model assignment solver (the value the CLI's ``--method`` and the
report's ``resync.method`` have always shown); ``paper``: Algorithm 1, greedy argmax."""

SOLVER_VERSION = "2"
"""Bumped whenever the solver's output (permutations, margins) can change for the same input:
a stored reference null computed by another version must be recomputed."""


@dataclass
class GroupResult:
    """What re-synchronization found for one group (the report's ``resync.groups`` entry)."""

    name: str
    size: int
    permutation: torch.Tensor
    moved: int
    mean_similarity: float
    min_margin: float
    ambiguous: int
    log10_p_value: float
    margins: torch.Tensor | None = field(default=None, repr=False)  # per neuron, of the last solve

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size,
            "moved": self.moved,
            "mean_similarity": self.mean_similarity,
            "min_margin": self.min_margin,
            "ambiguous": self.ambiguous,
            "log10_p_value": self.log10_p_value,
            "permutation": self.permutation.tolist(),
        }


@dataclass
class ResyncResult:
    """The re-synchronized state dict, one permutation per group, and the confidence in them."""

    state_dict: Mapping[str, torch.Tensor]
    permutations: dict[str, torch.Tensor]
    groups: list[GroupResult]
    log10_p_value: float
    seconds: float
    method: str
    device: str
    sweeps: int
    similarities: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    transforms: list[dict[str, Any]] = field(default_factory=list)  # findlady_core.canon: found and undone
    kept: dict[str, list[int]] = field(default_factory=dict)  # width groups: suspect position per neuron
    sketched: int = 0  # solves that stood on a sketch of long members (features.Sketch)
    confirmed: int = 0  # sketched solves redone on exact features because a margin was close

    @property
    def similarity_p_value(self) -> float:
        return 10.0**self.log10_p_value if self.log10_p_value > -300 else 0.0

    @property
    def moved(self) -> int:
        return sum(g.moved for g in self.groups)

    def to_dict(self) -> dict[str, Any]:
        """The report's ``resync`` block (docs/architecture.md, report format)."""
        return {
            "method": self.method,
            "device": self.device,
            "groups": [g.to_dict() for g in self.groups],
            "moved": self.moved,
            "similarity_p_value": self.similarity_p_value,
            "log10_p_value": self.log10_p_value,
            "ambiguous_margin": AMBIGUOUS_MARGIN,
            "sweeps": self.sweeps,
            "sketched": self.sketched,
            "confirmed": self.confirmed,
            "seconds": self.seconds,
            "transforms": self.transforms,
            "kept": self.kept,
        }


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` means CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise InputError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but CUDA is not available")
    return torch.device(device)


def combine_log_p(log_ps: Iterable[torch.Tensor]) -> float:
    """Fisher's combination of per-neuron natural-log p-values, returned as log10.

    ``X = -2 sum(ln p)`` follows chi-squared with 2n degrees of freedom under the null; its tail
    is taken through the Wilson-Hilferty normal approximation, which stays finite where the
    exact tail underflows. Neurons without evidence (p = 1) add nothing, as they should.
    """
    parts = [x.flatten() for x in log_ps]
    if not parts:
        return 0.0
    lp = torch.cat(parts).double().numpy()
    if lp.size == 0:
        return 0.0
    k = 2.0 * lp.size
    x = -2.0 * float(lp.sum())
    if x <= 0:
        return 0.0
    z = ((x / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return float(min(0.0, log_ndtr(-z) / math.log(10)))


def resync(
    reference: Mapping[str, torch.Tensor],
    suspect: Mapping[str, torch.Tensor],
    spec: Spec,
    *,
    method: str = "findlady",
    groups: list[str] | None = None,
    device: str = "auto",
    max_sweeps: int = 4,
    progress: bool | Progress | None = None,
    keep_similarities: bool = False,
    ignore: Iterable[tuple[str, int]] = (),
    sketch: bool = True,
    candidates: int | None = None,
) -> ResyncResult:
    """Re-synchronize ``suspect`` to ``reference`` on the groups of ``spec``.

    ``groups`` limits the search to those groups (the others are taken as unpermuted), e.g. the
    paper's one-layer setting. ``method="paper"`` reproduces the paper's Algorithm 1: each group
    in spec order, cosine of the neurons' own weights, greedy argmax (which may map two neurons to
    one place; kept for comparison, never for verdicts).

    ``ignore`` lists (tensor, axis) members that are moved but not used as evidence. The report
    ignores the input axes of a watermarked layer: matching neurons on the very weights the
    watermark is read from would pull an unrelated model's bits towards the key.

    ``candidates`` (the null, ``findlady_core.null``) solves a large group's assignment among
    each row's and column's ``candidates`` best entries (``assignment._assign``).
    """
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    spec.validate(reference)
    check_compatible(reference, suspect, names=spec.tensors, spec=spec)  # other widths allowed here
    start = time.perf_counter()
    if getattr(suspect, "lazy", False):  # produced with the reference's shapes (the null): nothing to fit
        width_fit = WidthFit()
    else:
        suspect, width_fit = fit_widths(reference, suspect, spec, device=device, ignore=ignore)
        check_compatible(reference, suspect, names=spec.tensors)
    dev = pick_device(device)
    active = spec.select(groups)
    ref = {k: reference[k].to(dev) for k in spec.tensors}  # on the CPU: the loaded tensors, not copies
    work = Work(suspect, spec, dev)
    step = _Steps(as_callback(progress), {g.name: _cost(reference, g) for g in active.groups})
    counts = (0, 0)
    if method == "paper":
        perms, stats, sims, sweeps = paper_solver(ref, work, active, step, keep_similarities)
    else:
        solver = AssignmentSolver(ref, work, spec, active, keep=keep_similarities, ignore=ignore, sketch=sketch,
                                  candidates=candidates)
        perms, stats, sims, sweeps = solver.run(max_sweeps, step)
        counts = (solver.sketched, solver.confirmed)
    step.finish()
    out = PermutedStateDict(suspect, {k: work.maps[k] for k in work.moved})
    log10_p = combine_log_p([st.log_p for st in stats.values()])
    group_results = []
    for g in active.groups:
        p = perms[g.name]
        st = stats[g.name]
        group_results.append(
            GroupResult(
                name=g.name,
                size=g.size,
                permutation=p,
                moved=int((p != torch.arange(g.size)).sum()),
                mean_similarity=float(st.matched.mean()),
                min_margin=float(st.margin.min()),
                ambiguous=int((st.margin < AMBIGUOUS_MARGIN).sum()),
                log10_p_value=combine_log_p([st.log_p]),
                margins=st.margin,
            )
        )
    return ResyncResult(
        state_dict=out,
        permutations=perms,
        groups=group_results,
        log10_p_value=log10_p,
        seconds=time.perf_counter() - start,
        method=method,
        device=str(dev),
        sweeps=sweeps,
        similarities=sims,
        transforms=width_fit.transforms,
        kept=width_fit.kept,
        sketched=counts[0],
        confirmed=counts[1],
    )


def _cost(reference: Mapping[str, torch.Tensor], g: Group) -> int:
    """Work units of solving ``g``: its similarity product (N x N x evidence length) plus the
    assignment (N^3), so progress and ETAs weigh a wide group more than a narrow one."""
    n = g.size
    d = sum(reference[m.tensor].numel() // max(1, reference[m.tensor].shape[m.axis]) * (m.block or 1)
            for m in g.members)
    return n * n * d + n**3


class _Steps:
    """The solvers' ``step(group_name)``: reports phase ``resync`` in cost units (``_cost``)."""

    def __init__(self, progress: Progress | None, cost: dict[str, int]) -> None:
        self.progress, self.cost = progress, cost
        self.total, self.done = sum(cost.values()), 0
        tick(progress, "resync", 0, self.total)

    def __call__(self, name: str) -> None:
        # The first pass solves each group once; refinement sweeps follow, so the phase is
        # complete only at ``finish``.
        self.done = min(self.total - 1, self.done + self.cost.get(name, 0))
        tick(self.progress, "resync", self.done, self.total)

    def finish(self) -> None:
        tick(self.progress, "resync", self.total, self.total)


__all__ = ["AMBIGUOUS_MARGIN", "METHODS", "SOLVER_VERSION", "STRONG_EVIDENCE", "GroupResult", "ResyncResult",
           "combine_log_p", "margins", "pick_device", "resync", "_assign"]
