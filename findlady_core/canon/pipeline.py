"""Re-synchronization with every canonicalization step, for the verdict (``report.verify``).

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
from findlady_core.canon.scales import scale_units, undo_linear_scales
from findlady_core.permute import index_maps
from findlady_core.resync import ResyncResult, resync
from findlady_core.spec import Spec


def canonical_resync(
    reference: Mapping[str, torch.Tensor], suspect: Mapping[str, torch.Tensor], spec: Spec, *,
    device: str = "auto", progress: bool | Callable[[str], None] = False, ignore: Iterable[tuple[str, int]] = (),
    keep_similarities: bool = False,
) -> ResyncResult:
    """``keep_similarities``: keep each group's N x N matrix (for ``findlady_core.visuals``); the
    margins ``report.mean_margins`` needs are kept per group either way."""
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
