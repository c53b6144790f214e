"""Re-synchronization with every canonicalization step, for the verdict (``report.verify``).

0. where the suspect is narrower than the reference in a width group and the reference has
   duplicate or dead neurons there, the reference is canonicalized first and the result
   expanded back to its shapes (``findlady_core.canon.refcanon``);
0b. in pre-norm transformers, a norm whose suspect weights are not the reference's is folded
   into the projections reading it, in both models (``findlady_core.canon.norms``): at once
   when its values are not a permutation of the reference's, else after a first pass whose
   permutation does not line them up; the result is unfolded onto the reference's norm
   weights and one ``norm_fold`` transform listed per folded norm;
1. ``resync`` (which first brings a suspect of another width to the reference's shapes);
2. where the spec has attention heads: head maps fitted and, when their held-out residual
   passes, undone (``findlady_core.canon.headmaps``);
3. where it has SwiGLU blocks or conv channels with BatchNorm: scales on those linear paths
   fitted and, when their held-out residual passes, undone (``findlady_core.canon.scales``);
4. when 2 or 3 undid anything, the canonical suspect is put back in its own order and
   re-synchronized once more with the fitted tensors left out of the evidence, so the
   similarity (and the permutations reported) come from evidence no fit used.
5. ``scale_transforms`` turns the rescales integrity found and undid into transform entries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from findlady_core.canon.headmaps import attention_layers, undo_head_maps
from findlady_core.canon.norms import differs, fold, fold_transforms, foldable_norms, same_values, unfold
from findlady_core.canon.refcanon import canonical_reference, expand
from findlady_core.canon.scales import scale_units, undo_linear_scales
from findlady_core.permute import index_maps
from findlady_core.rescale import undo_found_rescales
from findlady_core.resync import ResyncResult, resync
from findlady_core.rotation.family import Norm
from findlady_core.spec import Spec


def canonical_resync(
    reference: Mapping[str, torch.Tensor], suspect: Mapping[str, torch.Tensor], spec: Spec, *,
    device: str = "auto", progress: bool | Callable[[str], None] = False, ignore: Iterable[tuple[str, int]] = (),
    keep_similarities: bool = False,
) -> ResyncResult:
    """``keep_similarities``: keep each group's N x N matrix (for ``findlady_core.visuals``); the
    margins ``report.mean_margins`` needs are kept per group either way."""
    kw: dict[str, Any] = {"device": device, "progress": progress, "ignore": list(ignore), "keep_similarities": keep_similarities}
    rc = canonical_reference(reference, suspect, spec)
    if rc is not None:
        return expand(_with_norms(rc.reference, suspect, rc.spec, **kw), rc, reference, spec)
    return _with_norms(reference, suspect, spec, **kw)


def _with_norms(reference: Mapping[str, torch.Tensor], suspect: Mapping[str, torch.Tensor], spec: Spec,
                **kw: Any) -> ResyncResult:  # fmt: skip
    norms = foldable_norms(reference, suspect)
    fold_now = tuple(n for n in norms if not same_values(reference, suspect, n))
    if not fold_now:
        r = _canonical(reference, suspect, spec, **kw)
        # weights that are a permutation of the reference's, but not the stream's: fold after all
        fold_now = tuple(n for n in norms if differs(reference, _aligned(spec, r, suspect, (n,)), n))
        if not fold_now:
            return r
    folded_ref = fold(reference, fold_now)
    r = _canonical(folded_ref, fold(suspect, fold_now), spec, **kw)
    group_of = {m.tensor: g.name for g in spec.groups for m in g.members}
    aligned = _aligned(spec, r, suspect, fold_now)
    r.transforms += fold_transforms(reference, folded_ref, r.state_dict, aligned, fold_now, group_of)
    r.state_dict = unfold(r.state_dict, fold_now, reference, {k: v.dtype for k, v in suspect.items()})
    return r


def _aligned(spec: Spec, r: ResyncResult, suspect: Mapping[str, torch.Tensor], norms: tuple[Norm, ...]) -> dict[str, torch.Tensor]:
    """The suspect's norm weights and biases at the reference's positions (``r``'s permutations)."""
    tensors = {t for n in norms for t in (n.weight, n.bias) if t}
    names = {g.name for g in spec.groups for m in g.members if m.tensor in tensors and g.name in r.permutations}
    shapes = {m.tensor: suspect[m.tensor].shape for g in spec.groups if g.name in names for m in g.members}
    maps = index_maps(spec, {g: r.permutations[g] for g in names}, shapes)
    return {t: suspect[t].index_select(0, maps[(t, 0)]) if (t, 0) in maps else suspect[t] for t in tensors}


def _canonical(
    reference: Mapping[str, torch.Tensor], suspect: Mapping[str, torch.Tensor], spec: Spec, *,
    device: str, progress: bool | Callable[[str], None], ignore: Iterable[tuple[str, int]], keep_similarities: bool,
) -> ResyncResult:
    ignore = list(ignore)
    r = resync(reference, suspect, spec, device=device, progress=progress, keep_similarities=keep_similarities,
               ignore=ignore)
    shapes = {k: v.shape for k, v in reference.items()}
    # the re-synchronized suspect stays lazy (lazy.PermutedStateDict): the fits read the tensors
    # they need, and a dict of it would hold a re-indexed copy of the whole model
    undone, transforms, head_perms, scale_perms, fitted = r.state_dict, [], {}, {}, set()
    if attention_layers(spec):
        undone, transforms, head_perms, fitted = undo_head_maps(reference, undone, spec)
    if scale_units(spec, shapes):
        undone, more, scale_perms, used = undo_linear_scales(reference, undone, spec)
        transforms += more
        fitted |= used
    if not transforms and not head_perms and not scale_perms:
        return r
    maps = index_maps(spec, r.permutations, shapes)
    # resynced = suspect[maps], undone = resynced[step]: the suspect file's order is maps[step]
    for perms in (head_perms, scale_perms):
        for key, step in index_maps(spec, perms, shapes).items():
            maps[key] = maps[key][step] if key in maps else step
    own_order = dict(undone)
    for (t, axis), mp in maps.items():
        own_order[t] = own_order[t].index_select(axis, torch.argsort(mp).to(own_order[t].device))
    held_out = ignore + [(t, a) for t in sorted(fitted) for a in range(reference[t].dim())]
    r2 = resync(reference, own_order, spec, device=device, keep_similarities=keep_similarities, ignore=held_out)
    r2.transforms = r.transforms + transforms + r2.transforms
    r2.kept = r.kept
    r2.seconds += r.seconds
    return r2


def scale_transforms(rescaled: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One ``scale`` entry per group from ``IntegrityResult.rescaled`` (reference indices)."""
    by_group: dict[str, list[dict[str, Any]]] = {}
    for row in rescaled:
        by_group.setdefault(row["group"], []).append(row)
    return [{"kind": "scale", "group": g, "neurons": [r["neuron"] for r in rows], "factors": [r["factor"] for r in rows],
             "residual": None, "function_preserving": True,
             "checked": "fit on the neuron's own parameters; its consumers' weights agree with 1/c within the integrity tolerance"}
            for g, rows in by_group.items()]


READ_TOLERANCE = 0.1
"""Norm log-ratio (and cosine drop) within which a rescale explains a neuron for the watermark
read: looser than integrity's 1%, so that rescales are still undone under noise."""


def for_reading(reference: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], spec: Spec) -> Mapping[str, torch.Tensor]:
    """``state`` with positive per-neuron rescales divided out, for reading a watermark only.

    Integrity undoes rescales only where both sides agree within its tolerance (1%), so under
    noise a rescaled neuron stays rescaled, and a layer's mean over its output neurons (the
    Uchida read) is a re-weighted mean: bits flip. Here the same joint estimate
    (``findlady_core.rescale``) runs with ``READ_TOLERANCE``: a factor is kept where the
    neuron's own parameters and its consumers both agree with it to a cosine of 0.9 (an
    unrelated neuron's cosine is near 0), and factors within 10% of 1 are left alone (noise
    alone). The verdict's similarity and integrity never see this state."""
    return undo_found_rescales(reference, state, spec, READ_TOLERANCE)
