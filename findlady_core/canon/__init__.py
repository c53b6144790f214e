"""Canonicalization: function-preserving transforms beyond permutations, found and undone.

``widths`` (split and dummy neurons, suspects of another width), ``fit`` (bringing a suspect to
the reference's shapes), ``headmaps`` (invertible maps inside attention heads), ``scales``
(rescales reported as transforms). Each transform found is one ``resync.transforms`` entry:
``{"kind": "scale" | "merge" | "drop" | "pad" | "head_map", "group", "neurons", "residual",
"function_preserving"}``; ``residual`` is the fit's error on evidence it was not fit on (or,
for merges, how far the copies are from exact).
"""
