"""Plain sentences for the transforms a verification found (the report's ``reasons``)."""

from __future__ import annotations

from typing import Any


def transform_reasons(transforms: list[dict[str, Any]]) -> list[str]:
    """One sentence per kind; rescales have their own sentence in the integrity reasons."""
    out = []
    merges = [t for t in transforms if t["kind"] == "merge"]
    if merges:
        groups = sorted({t["group"] for t in merges})
        out.append(f"{sum(len(t['neurons']) - 1 for t in merges):,} split neurons were merged back into "
                   f"{len(merges):,} (equal incoming weights, outgoing weights summed) in group(s) {', '.join(groups[:5])}"
                   + (" ..." if len(groups) > 5 else ""))
    drops = [t for t in transforms if t["kind"] == "drop" and t.get("function_preserving", True)]
    if drops:
        out.append(f"{sum(len(t['neurons']) for t in drops):,} dummy neurons contributing nothing were dropped "
                   f"(outgoing weights zero after merging) in group(s) {', '.join(sorted({t['group'] for t in drops})[:5])}")
    extra = [t for t in transforms if not t.get("function_preserving", True)]
    for t in extra:
        what = "extra suspect neurons matched no reference neuron and were left out" if t["kind"] == "drop" \
            else "reference neurons have no counterpart in the narrower suspect"
        out.append(f"group '{t['group']}': {len(t['neurons']):,} {what} (a real change)")
    paths = [t for t in transforms if t["kind"] == "scale" and "path" in t]
    if paths:
        out.append(f"{sum(len(t['neurons']) for t in paths):,} neurons scaled on linear paths (SwiGLU up/down, conv "
                   f"channels through BatchNorm; any c != 0) were scaled back (held-out residual at most "
                   f"{max(t['residual'] for t in paths):.3g}); the fitted tensors were left out of the similarity evidence")
    maps = [t for t in transforms if t["kind"] == "head_map"]
    if maps:
        worst = max(t["residual"] for t in maps)
        out.append(f"{len(maps):,} invertible maps inside attention heads were undone (q/k and v/o; held-out "
                   f"residual at most {worst:.3g}); q and v were left out of the similarity evidence")
    folds = [t for t in transforms if t["kind"] == "norm_fold"]
    if folds:
        out.append(f"{len(folds):,} norm weights differed from the reference's on {sum(t['neurons'] for t in folds):,} "
                   f"channels (factors {min(t['factor_min'] for t in folds):.3g} to {max(t['factor_max'] for t in folds):.3g}): "
                   "folded into the projections reading them, in both models, before comparing")
    return out
