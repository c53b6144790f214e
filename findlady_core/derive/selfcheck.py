"""Self-check of a derived spec: permute every group of a shrunk copy and compare outputs.

The full-size model is only ever built on the meta device, so the check runs the same class
built from a shrunk config (few layers, small widths, the same heads, kv heads, rotary fraction
and stages) in float64 with random weights. The shrunk spec is derived by the same code and must
match the full one group for group (same names, same tensors and axes); every group is then
permuted at random and the outputs compared. Outputs the spec permutes (a base model's hidden
states) are compared after applying the same permutation to the reference outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from findlady_core.derive import config as C
from findlady_core.derive.build import OUTPUT, Derived, derive
from findlady_core.derive.names import stored_names
from findlady_core.errors import SpecError
from findlady_core.permute import apply_permutations, index_maps
from findlady_core.spec import Group, Spec

TOLERANCE = 1e-9
TOLERANCE_FLOAT32 = 1e-6  # transformers computes some norms in float32 even in a float64 model
MAX_CHECK_PARAMETERS = 20_000_000


def _randomize(model: nn.Module, seed: int) -> None:
    """Random weights of unit-ish scale everywhere: an init with ones and zeros (norm scales,
    biases) would hide a group that moves them wrongly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = max(1, p[0].numel())
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / fan_in**0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5 + 0.5)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g, dtype=torch.float64) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g, dtype=torch.float64) * 0.1)


def _outputs(model: nn.Module, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs)
    items = out.to_tuple() if hasattr(out, "to_tuple") else (out if isinstance(out, (list, tuple)) else (out,))
    return [t for t in _flatten(items) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _flatten(items: Any) -> list[Any]:
    out: list[Any] = []
    for x in items:
        out += _flatten(x) if isinstance(x, (list, tuple)) else [x]
    return out


def _error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        scale = float(x.abs().max()) or 1.0
        worst = max(worst, float((x - y).abs().max()) / scale)
    return worst


def _perms(spec: Spec, seed: int) -> dict[str, torch.Tensor]:
    """A random permutation per group, never the identity (it would check nothing)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for grp in spec.groups:
        p = torch.randperm(grp.size, generator=g)
        if torch.equal(p, torch.arange(grp.size)):
            p = torch.roll(p, 1)
        out[grp.name] = p
    return out


def _signature(spec: Spec) -> dict[str, set[tuple[str, int, str | None]]]:
    return {g.name: {(m.tensor, m.axis, m.role) for m in g.members} for g in spec.groups}


def shrunk_model(cfg: Mapping[str, Any]) -> tuple[nn.Module, Any, dict[str, Any]]:
    """The shrunk class in float64 on the CPU; the config itself when it cannot be shrunk but
    is small already."""
    for small in (C.shrink(cfg), C.shrink(cfg, layers=False)):
        try:
            model, conf = C.build(small, device="cpu")
            return model.double().eval(), conf, small
        except SpecError:
            pass  # the class rejects these small widths: try keeping the layers, then the config
    model, conf = C.build(cfg, device="meta")
    n = sum(p.numel() for p in model.parameters())
    if n > MAX_CHECK_PARAMETERS:
        raise SpecError(
            f"self-check: the config cannot be shrunk ({type(model).__name__} rejects small widths) and "
            f"is too large ({n} parameters) to check as it is"
        )
    model, conf = C.build(cfg, device="cpu")
    return model.double().eval(), conf, dict(cfg)


def self_check(cfg: Mapping[str, Any], full: list[Group], *, seed: int = 0) -> dict[str, Any]:
    """Refuse (SpecError naming the group) unless every group of the shrunk copy keeps the
    outputs; returns what was checked."""
    model, conf, small = shrunk_model(cfg)
    names = stored_names(model)
    inputs = C.example_inputs(model, conf, device="cpu", seed=seed)
    inputs = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inputs.items()}
    derived = derive(model, inputs, names, pin_outputs=False)
    spec = Spec(tuple(derived.groups))
    # On the tensors both models have (the first layers, embeddings, heads), the full-size
    # spec must have exactly the shrunk spec's groups and members.
    common = {t for ts in names.values() for t in ts}
    full_sig = {n: {m for m in sig if m[0] in common} for n, sig in _signature(Spec(tuple(full))).items()}
    small_sig = _signature(spec)
    for name in sorted(set(small_sig) | {n for n, sig in full_sig.items() if sig}):
        if small_sig.get(name) != full_sig.get(name):
            raise SpecError(f"self-check: group {name!r} differs between the full-size spec and the shrunk model's")
    _randomize(model, seed)
    module_sd = model.state_dict()
    # the spec names stored tensors; the module loads them under its own names
    sd = {t: module_sd[k] for k, ts in names.items() for t in ts}
    ref = _outputs(model, inputs)
    tol = TOLERANCE_FLOAT32 if derived.float32_inside else TOLERANCE

    def load(stored: Mapping[str, torch.Tensor]) -> None:
        model.load_state_dict({k: stored[ts[0]] for k, ts in names.items() if ts}, strict=False)

    def error(groups: list[str]) -> float:
        perms = {n: p for n, p in _perms(spec, seed + 1).items() if n in groups}
        load(apply_permutations(sd, spec, perms))
        got = _outputs(model, inputs)
        load(sd)
        return _error(_expected(ref, spec, derived, perms), got)

    err = error(spec.names)
    if err > tol:
        for name in spec.names:  # find the group that breaks the model
            e = error([name])
            if e > tol:
                raise SpecError(f"self-check failed: permuting group {name!r} changes the outputs (relative error {e:.2e} > {tol:g})")
        raise SpecError(f"self-check failed: permuting all groups changes the outputs (relative error {err:.2e} > {tol:g})")
    return {"groups": len(spec.groups), "neurons": spec.neurons, "relative_error": err, "tolerance": tol,
            "shrunk": {k: small[k] for k in small if k in C.LAYER_KEYS + C.HEAD_KEYS + ("hidden_size", "n_embd", "hidden_sizes", "depths")}}


def _expected(ref: list[torch.Tensor], spec: Spec, derived: Derived, perms: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The reference outputs with the spec's permutation of them applied (none when pinned)."""
    if not derived.output_members:
        return ref
    groups = tuple(
        Group(g.name, g.size, tuple(derived.output_members[g.name])) for g in spec.groups if g.name in derived.output_members
    )
    out_spec = Spec(groups)
    shapes = {f"{OUTPUT}{k}": t.shape for k, t in enumerate(ref)}
    maps = index_maps(out_spec, {n: p for n, p in perms.items() if n in out_spec.names}, shapes)
    out = list(ref)
    for (name, axis), idx in maps.items():
        k = int(name[len(OUTPUT):])
        out[k] = out[k].index_select(axis, idx)
    return out
