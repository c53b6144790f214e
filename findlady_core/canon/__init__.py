"""Canonicalization: function-preserving transforms beyond permutations, found and undone.

``widths`` (split and dummy neurons, suspects of another width), ``fit`` (bringing a suspect to
the reference's shapes), ``attention`` (where heads sit in a spec), ``headmaps`` (invertible maps inside attention heads,
GQA and rotary included), ``scales`` (scales on linear paths: SwiGLU, conv + BatchNorm), ``norms`` (norm
weights folded into the projections reading them, pre-norm transformers). Each transform found is one ``resync.transforms`` entry:
``{"kind": "scale" | "merge" | "drop" | "pad" | "head_map" | "norm_fold", "group", "neurons", "residual",
"function_preserving"}``; ``residual`` is the fit's error on evidence it was not fit on (or,
for merges, how far the copies are from exact).
"""
